//! Writes what the Debian package ships beside the binary:
//!
//! ```sh
//! cargo run --example gen-assets -- target/assets
//! ```
//!
//! - `man/tokend.8` and a page per command (`man/tokend-accounts-import.8`, …) from the clap
//!   definitions (`tokend::cli::Cli`), with EXIT STATUS taken from README's "Exit codes";
//! - `man/tokend.toml.5` from README's "Configuration" section, the one configuration
//!   reference, with the documented example `config/tokend.toml`;
//! - `completions/tokend.bash`, `completions/_tokend`, `completions/tokend.fish`.
//!
//! Its tests (`cargo test` runs them) fail when README's configuration tables or the example
//! file name other keys than the config parser accepts, so the man page cannot drift from the
//! code unnoticed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

const README: &str = include_str!("../README.md");
const EXAMPLE_CONFIG: &str = include_str!("../config/tokend.toml");

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example gen-assets -- OUT_DIR");
        std::process::exit(2);
    };
    if let Err(e) = generate(Path::new(&out)) {
        eprintln!("gen-assets: {e}");
        std::process::exit(1);
    }
}

fn generate(out: &Path) -> Result<(), String> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut written = Vec::new();
    for (name, page) in command_pages()? {
        written.push(write(&man.join(name), page.as_bytes())?);
    }
    written.push(write(
        &man.join("tokend.toml.5"),
        config_page()?.as_bytes(),
    )?);
    for (shell, name) in [
        (Shell::Bash, "tokend.bash"),
        (Shell::Zsh, "_tokend"),
        (Shell::Fish, "tokend.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command(), "tokend", &mut script);
        written.push(write(&completions.join(name), &script)?);
    }
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

fn write(path: &Path, contents: &[u8]) -> Result<PathBuf, String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.to_owned())
}

/// The command line as clap sees it, without clap's `help` subcommand (`--help` documents
/// itself; a `tokend-help(8)` page would say nothing).
fn command() -> clap::Command {
    let mut cmd = tokend::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

fn man(cmd: clap::Command) -> clap_mangen::Man {
    let title = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_uppercase();
    clap_mangen::Man::new(cmd)
        .title(title)
        .date(date())
        .section("8")
        .manual("System Administration")
        .source(format!("tokend {}", env!("CARGO_PKG_VERSION")))
}

/// The pages' date: `$SOURCE_DATE_EPOCH`'s when set (reproducible builds), else today's.
fn date() -> String {
    let at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .unwrap_or_else(chrono::Utc::now);
    at.format("%Y-%m-%d").to_string()
}

/// `tokend.8`, then `tokend-<command>.8` for every command, nested ones included.
fn command_pages() -> Result<Vec<(String, String)>, String> {
    let cmd = command();
    let mut page = Vec::new();
    let top = man(cmd.clone());
    let render = |r: std::io::Result<()>| r.map_err(|e| format!("cannot render tokend(8): {e}"));
    render(top.render_title(&mut page))?;
    page.extend_from_slice(b".nh\n.ad l\n");
    render(top.render_name_section(&mut page))?;
    render(top.render_synopsis_section(&mut page))?;
    if cmd.get_long_about().is_some() {
        render(top.render_description_section(&mut page))?;
    } else {
        // The one-line `about` says little; README's opening paragraph says what tokend does.
        page.extend_from_slice(b".SH DESCRIPTION\n");
        page.extend_from_slice(markdown_to_roff(readme_intro()?).as_bytes());
    }
    render(top.render_options_section(&mut page))?;
    render(top.render_subcommands_section(&mut page))?;
    if cmd.get_after_help().is_some() || cmd.get_after_long_help().is_some() {
        render(top.render_extra_section(&mut page))?;
    }
    let mut page = String::from_utf8(page).map_err(|e| e.to_string())?;
    page.push_str(&tokend_extra_sections(&cmd)?);
    let mut pages = vec![("tokend.8".to_owned(), page)];
    fn nested(cmd: &clap::Command, pages: &mut Vec<(String, String)>) -> Result<(), String> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let m = man(sub.clone());
            let mut page = Vec::new();
            m.render(&mut page)
                .map_err(|e| format!("cannot render {}: {e}", m.get_filename()))?;
            let mut page = String::from_utf8(page).map_err(|e| e.to_string())?;
            page.push_str(".SH \"SEE ALSO\"\n\\fBtokend\\fR(8), \\fBtokend.toml\\fR(5)\n");
            pages.push((m.get_filename(), page));
            nested(sub, pages)?;
        }
        Ok(())
    }
    nested(&cmd, &mut pages)?;
    Ok(pages)
}

/// What tokend(8) says beyond the clap definitions: exit codes (README's), the environment,
/// files, and where to read on.
fn tokend_extra_sections(cmd: &clap::Command) -> Result<String, String> {
    let mut s = String::new();
    s.push_str(".SH \"EXIT STATUS\"\n");
    s.push_str(&markdown_to_roff(readme_section("Exit codes")?));
    s.push_str(
        r#".SH ENVIRONMENT
.TP
\fBTOKEND_CONFIG\fR
The configuration file when \fB\-\-config\fR is not given (default \fI/etc/tokend/tokend.toml\fR).
.TP
\fBCREDENTIALS_DIRECTORY\fR
Where \fBclient_secret_credential\fR names are read from; systemd sets it for the service.
Without it, the credential stores \fI/etc/credstore\fR, \fI/run/credstore\fR,
\fI/usr/local/lib/credstore\fR and \fI/usr/lib/credstore\fR are searched, so
\fBtokend check\-config\fR run by hand reads the secret the service will get.
.TP
\fBTOKEND_CREDSTORE_PATH\fR
A colon\-separated list of directories that replaces the credential stores above.
.TP
\fBJOURNAL_STREAM\fR
Set by systemd; when it names standard error, log events go to the journal with their fields
(\fBTOKEND_ACCOUNT_ID\fR, \fBTOKEND_PROFILE\fR, …), or to standard error with \fB<N>\fR
priority prefixes when the journal's socket is not there.
.TP
\fBTOKEND_JOURNAL_SOCKET\fR
Replaces the journal's socket path (\fI/run/systemd/journal/socket\fR), for tests.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Set by systemd for \fBType=notify\fR and \fBWatchdogSec=\fR.
.TP
\fBRUST_LOG\fR
A tracing filter that overrides \fBlog_level\fR, for debugging one module.
.SH FILES
.TP
\fI/etc/tokend/tokend.toml\fR
The configuration; see \fBtokend.toml\fR(5).
.TP
\fI/etc/credstore/factorial\-client\-secret\fR
The client secret, as the shipped unit's \fBLoadCredential=\fR and the example configuration name it.
.TP
\fI/var/lib/tokend/tokend.db\fR, \fI/var/lib/tokend/tokend.db.recovery\fR
The account store and its recovery journal.
.TP
\fI/run/tokend/health.json\fR
The health file that \fBtokend status\fR reads.
.TP
\fI/lib/systemd/system/tokend.service\fR
The systemd unit (\fI/usr/lib/systemd/system\fR on a merged \fI/usr\fR is the same directory).
.SH "SEE ALSO"
"#,
    );
    let mut see_also = vec![r"\fBtokend.toml\fR(5)".to_owned()];
    fn names(prefix: &str, cmd: &clap::Command, out: &mut Vec<String>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{prefix}-{}", sub.get_name());
            out.push(format!(r"\fB{}\fR(8)", name.replace('-', r"\-")));
            names(&name, sub, out);
        }
    }
    names("tokend", cmd, &mut see_also);
    for (name, section) in [
        ("systemctl", 1),
        ("journalctl", 1),
        ("systemd.exec", 5),
        ("systemd-creds", 1),
    ] {
        see_also.push(format!(r"\fB{}\fR({section})", name.replace('-', r"\-")));
    }
    s.push_str(&see_also.join(",\n"));
    s.push_str("\n.PP\nThe full reference: \\fI/usr/share/doc/tokend/README.md\\fR.\n");
    Ok(s)
}

/// tokend.toml(5): README's "Configuration" section, then the shipped example.
fn config_page() -> Result<String, String> {
    let mut s = format!(
        ".TH TOKEND.TOML 5 {} \"tokend {}\" \"File Formats\"\n",
        date(),
        env!("CARGO_PKG_VERSION")
    );
    // No hyphenation: keys, paths and URLs are copied from man pages.
    s.push_str(".nh\n.ad l\n");
    s.push_str(
        ".SH NAME\ntokend.toml \\- configuration file of tokend(8)\n\
         .SH SYNOPSIS\n\\fI/etc/tokend/tokend.toml\\fR\n.SH DESCRIPTION\n",
    );
    s.push_str(&markdown_to_roff(readme_section("Configuration")?));
    s.push_str(
        ".PP\nCheck a file with \\fBtokend \\-\\-config\\fR \\fIFILE\\fR \\fBcheck\\-config\\fR \
         (exit 78 when invalid); the running service rereads it on \
         \\fBsystemctl reload tokend\\fR.\n.SH EXAMPLE\nThe example installed as \
         \\fI/etc/tokend/tokend.toml\\fR, with every key:\n.PP\n.RS 4\n.nf\n",
    );
    for line in EXAMPLE_CONFIG.lines() {
        s.push_str(&escape_line(&escape(line)));
        s.push('\n');
    }
    s.push_str(
        ".fi\n.RE\n.SH \"SEE ALSO\"\n\\fBtokend\\fR(8), \\fBsystemd.exec\\fR(5) \
         (\\fBLoadCredential=\\fR), \\fBsystemd\\-creds\\fR(1)\n",
    );
    Ok(s)
}

/// README's first paragraph (after the title).
fn readme_intro() -> Result<&'static str, String> {
    let start = README
        .find("\n\n")
        .ok_or("README.md has no opening paragraph")?;
    let end = README[start + 2..]
        .find("\n\n")
        .map_or(README.len(), |i| start + 2 + i);
    Ok(&README[start..end])
}

/// The body of README's `## {title}` section.
fn readme_section(title: &str) -> Result<&'static str, String> {
    let head = format!("\n## {title}\n");
    let start = README
        .find(&head)
        .map(|i| i + head.len())
        .ok_or_else(|| format!("README.md has no \"## {title}\" section"))?;
    let end = README[start..]
        .find("\n## ")
        .map_or(README.len(), |i| start + i);
    Ok(&README[start..end])
}

/// The Markdown README uses, as roff: paragraphs, `code` and **bold**, fenced code, lists, and
/// tables (a table becomes a list of `.TP` entries: the first cell as the tag, a second cell
/// in parentheses as the default when there are three).
fn markdown_to_roff(md: &str) -> String {
    let mut out = String::new();
    let mut lines = md.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with("```") {
            out.push_str(".PP\n.RS 4\n.nf\n");
            for code in lines.by_ref() {
                if code.trim_start().starts_with("```") {
                    break;
                }
                out.push_str(&escape_line(&escape(code)));
                out.push('\n');
            }
            out.push_str(".fi\n.RE\n");
        } else if trimmed.starts_with('|') {
            let mut rows = vec![trimmed];
            while let Some(next) = lines.peek().filter(|l| l.starts_with('|')) {
                rows.push(next.trim_end());
                lines.next();
            }
            table(&rows, &mut out);
        } else if let Some(item) = trimmed.strip_prefix("- ") {
            let mut text = item.to_owned();
            while let Some(next) = lines.peek().filter(|l| l.starts_with("  ")) {
                text.push(' ');
                text.push_str(next.trim());
                lines.next();
            }
            out.push_str(".IP \\(bu 2\n");
            out.push_str(&escape_line(&inline(&text)));
            out.push('\n');
        } else {
            let mut text = trimmed.to_owned();
            while let Some(next) = lines.peek().filter(|l| {
                let t = l.trim();
                !t.is_empty()
                    && !t.starts_with('|')
                    && !t.starts_with("```")
                    && !t.starts_with("- ")
            }) {
                text.push(' ');
                text.push_str(next.trim());
                lines.next();
            }
            // A table's heading, such as "`[daemon]`", is a subsection.
            out.push_str(if text.starts_with("`[") {
                ".SS "
            } else {
                ".PP\n"
            });
            out.push_str(&escape_line(&inline(&text)));
            out.push('\n');
        }
    }
    out
}

fn table(rows: &[&str], out: &mut String) {
    // The header row and the |---| rule say nothing a list entry needs.
    for row in rows.iter().skip(2) {
        let cells = cells(row);
        let Some(tag) = cells.first() else { continue };
        out.push_str(".TP\n");
        let mut head = inline(tag);
        if cells.len() >= 3 && !cells[1].is_empty() {
            if cells[1].starts_with('`') {
                let _ = write!(head, " (default {})", inline(&cells[1]));
            } else {
                let _ = write!(head, " ({})", inline(&cells[1]));
            }
        }
        out.push_str(&escape_line(&head));
        out.push('\n');
        let rest = cells.last().filter(|_| cells.len() >= 2);
        out.push_str(&escape_line(&inline(rest.map_or("", String::as_str))));
        out.push('\n');
    }
}

/// The cells of a table row; `\|` is a literal bar.
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                push(&mut cells, '|');
            }
            '|' => cells.push(String::new()),
            c => push(&mut cells, c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

fn push(cells: &mut [String], c: char) {
    if let Some(cell) = cells.last_mut() {
        cell.push(c);
    }
}

/// Inline Markdown: `code` in bold with literal dashes, **bold**, [text](url) as "text (url)".
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('`') {
            if let Some(end) = after.find('`') {
                let _ = write!(out, "\\fB{}\\fR", escape(&after[..end]).replace('-', "\\-"));
                rest = &after[end + 1..];
                continue;
            }
        }
        if let Some(after) = rest.strip_prefix("**") {
            if let Some(end) = after.find("**") {
                let _ = write!(out, "\\fB{}\\fR", inline(&after[..end]));
                rest = &after[end + 2..];
                continue;
            }
        }
        if let Some(after) = rest.strip_prefix('[') {
            if let Some((label, tail)) = after.split_once("](") {
                if let Some((url, tail)) = tail.split_once(')') {
                    let _ = write!(out, "{} ({})", inline(label), escape(url));
                    rest = tail;
                    continue;
                }
            }
        }
        // Up to the next place markup may start, at least one character.
        let first = rest.chars().next().map_or(1, char::len_utf8);
        let next = rest[first..]
            .find(['`', '*', '['])
            .map_or(rest.len(), |i| i + first);
        out.push_str(&escape(&rest[..next]));
        rest = &rest[next..];
    }
    out
}

/// Text as roff reads it literally: backslashes escaped.
fn escape(text: &str) -> String {
    text.replace('\\', "\\e")
}

/// A line roff would take for a request (leading `.` or `'`) made text.
fn escape_line(line: &str) -> String {
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The keys README's configuration tables document, for the table after `marker`.
    fn readme_keys(marker: &str) -> BTreeSet<String> {
        let section = readme_section("Configuration").expect("section");
        let start = section.find(marker).expect("marker");
        let mut keys = BTreeSet::new();
        let rows = section[start..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2);
        for row in rows {
            let first = cells(row).swap_remove(0);
            keys.extend(first.split('`').skip(1).step_by(2).map(str::to_owned));
        }
        keys
    }

    /// The keys the config parser accepts in `table`, from the error a key it does not know
    /// gets ("unknown field …, expected one of `a`, `b`, …").
    fn parser_keys(table: &str) -> BTreeSet<String> {
        let text = format!("{table}\nnot_a_key_at_all = 1\n");
        let Err(err) = tokend::config::Config::parse(Path::new("probe.toml"), &text) else {
            panic!("an unknown key was accepted");
        };
        let err = err.to_string();
        let expected = err
            .split_once("expected")
            .unwrap_or_else(|| panic!("no list of keys in {err:?}"))
            .1;
        // The message ends by quoting the line: "(at `not_a_key_at_all = 1`)".
        let expected = expected.split(" (at ").next().unwrap_or(expected);
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// The configuration's tables, as headed in TOML.
    const TABLES: [&str; 4] = ["[daemon]", "[[profile]]", "[api]", "[[notify]]"];

    /// The keys `config/tokend.toml` shows, set or commented out, per table (a commented-out
    /// `# [[notify]]` heads its table too).
    fn example_keys() -> std::collections::BTreeMap<&'static str, BTreeSet<String>> {
        let mut keys: std::collections::BTreeMap<&str, BTreeSet<String>> =
            TABLES.iter().map(|t| (*t, BTreeSet::new())).collect();
        let mut table = "";
        for line in EXAMPLE_CONFIG.lines() {
            let body = line.trim_start_matches('#').trim();
            if let Some(t) = TABLES.iter().find(|t| **t == body) {
                table = t;
                continue;
            }
            // "# # name = ..." documents a key of a commented-out table.
            let body = body.trim_start_matches('#').trim_start();
            let Some((key, _)) = body.split_once(" = ") else {
                continue;
            };
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.get_mut(table)
                    .unwrap_or_else(|| panic!("key {key} outside a table"))
                    .insert(key.to_owned());
            }
        }
        keys
    }

    #[test]
    fn readme_documents_exactly_the_keys_the_parser_accepts() {
        let daemon = parser_keys("[daemon]");
        let profile = parser_keys("[[profile]]");
        assert!(
            daemon.contains("refresh_lead") && daemon.len() > 20,
            "{daemon:?}"
        );
        assert!(
            profile.contains("client_id") && profile.len() > 10,
            "{profile:?}"
        );
        let example = example_keys();
        for table in TABLES {
            let parsed = parser_keys(table);
            assert!(parsed.len() > 3, "{table}: {parsed:?}");
            assert_eq!(
                readme_keys(&format!("`{table}`")),
                parsed,
                "README's {table} table"
            );
            assert_eq!(example[table], parsed, "config/tokend.toml's {table}");
        }
    }

    #[test]
    fn the_config_page_lists_every_key_with_its_default() {
        let page = config_page().expect("page");
        for key in TABLES.into_iter().flat_map(parser_keys) {
            let tag = format!("\\fB{}\\fR", key);
            assert!(page.contains(&tag), "{key} missing from tokend.toml(5)");
        }
        assert!(page.contains(".TP\n\\fBrefresh_lead\\fR (default \\fB10m\\fR)\n"));
        assert!(page.contains(".TP\n\\fBname\\fR (required)\n"));
        // Nothing roff would take for a request, no Markdown left over.
        for line in page.lines().filter(|l| l.starts_with('.')) {
            let request = line[1..].split_whitespace().next().unwrap_or("");
            assert!(
                [
                    "TH", "SH", "SS", "PP", "TP", "RS", "RE", "nf", "fi", "IP", "nh", "ad"
                ]
                .contains(&request),
                "unexpected request in {line:?}"
            );
        }
        assert!(
            !page.contains("**") && !page.contains("| "),
            "Markdown left in the page"
        );
    }

    #[test]
    fn every_command_has_a_page_and_tokend_8_names_them() {
        let pages = command_pages().expect("pages");
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "tokend.8",
            "tokend-run.8",
            "tokend-check-config.8",
            "tokend-accounts.8",
            "tokend-accounts-import.8",
            "tokend-status.8",
        ] {
            assert!(names.contains(&want), "{want} not among {names:?}");
        }
        let main = &pages[0].1;
        assert!(main.contains("\n.TH TOKEND 8 "), "{main}");
        assert!(
            main.contains("\n.SH DESCRIPTION\n") && main.contains("Factorial HR"),
            "no description"
        );
        for section in [
            "SYNOPSIS",
            "SUBCOMMANDS",
            "EXIT STATUS",
            "FILES",
            "SEE ALSO",
        ] {
            assert!(main.contains(section), "no {section} in tokend(8)");
        }
        assert!(main.contains("tokend\\-accounts\\-import\\fR(8)"), "{main}");
        assert!(main.contains("EX_CONFIG"), "exit codes missing");
    }

    #[test]
    fn inline_markdown_becomes_roff() {
        assert_eq!(
            inline("a `--config PATH` and **bold** [x](http://e)"),
            "a \\fB\\-\\-config PATH\\fR and \\fBbold\\fR x (http://e)"
        );
        assert_eq!(escape_line(".hidden"), "\\&.hidden");
        assert_eq!(cells("| `a` \\| b | c |"), ["`a` | b", "c"]);
    }
}
