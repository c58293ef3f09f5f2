//! The `tokend` binary: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = tokend::cli::Cli::parse();
    std::process::exit(tokend::cli::main(cli));
}
