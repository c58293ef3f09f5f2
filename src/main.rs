//! The `tokend` binary: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

/// mimalloc rather than glibc's malloc: the token API and the engine allocate and free across
/// threads (a row built on the store's thread, its answer freed on a runtime worker), which
/// glibc pays for in arena locks and chunk coalescing (a sixth of tokend's CPU under a token
/// fetch load, measured with `perf`; BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = tokend::cli::Cli::parse();
    std::process::exit(tokend::cli::main(cli));
}
