//! Logging: tracing events to the journal or to stderr, in one of four shapes.
//!
//! - Under systemd (`$JOURNAL_STREAM` names stderr's device and inode) with the journal's
//!   socket there: each event is one journal entry sent over the native protocol, with
//!   `PRIORITY` (`3` error ... `7` debug), `MESSAGE` (the line a terminal would show, without
//!   the time) and every field as `TOKEND_<NAME>` (`account_id` → `TOKEND_ACCOUNT_ID`), so
//!   `journalctl TOKEND_ACCOUNT_ID=user-1` finds an account's lines.
//! - Under systemd without the socket (or when a send fails): the same line on stderr, prefixed
//!   with its sd-daemon priority (`<3>` ... `<7>`), no time, no colour; `journalctl -p` works.
//! - `log_format = "json"`: one JSON object a line, the event's fields at the top level beside
//!   `timestamp`, `level`, `message` and `target`; a field keeps one JSON type in every event.
//! - Otherwise the usual readable format, coloured only on a terminal.
//!
//! Times are RFC 3339 in UTC. Fields that carry unix seconds are named `…_at` (as the database
//! columns are) and are integers; text lines and `MESSAGE` show them as RFC 3339, JSON and the
//! journal's `TOKEND_…_AT` fields keep the integer.
//!
//! The level can change at run time (SIGHUP reload) through [`LogHandle`]. The daemon's
//! stderr lines are written in batches ([`lines`]).

use std::fmt;
use std::io::IsTerminal;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{self, DefaultVisitor, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, format::Format};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, reload, util::SubscriberInitExt};

use crate::clock::rfc3339;
use crate::config::{LogFormat, LogLevel};

mod lines;

pub use lines::{Batching, batch, finish, flush};

/// Where journald listens for native-protocol entries.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Changes the level filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl LogHandle {
    pub fn set_level(&self, level: LogLevel) {
        let _ = self.0.modify(|f| *f = filter(level));
    }
}

fn filter(level: LogLevel) -> EnvFilter {
    // RUST_LOG wins when set, for debugging one module; the cron scheduler is chatty at info.
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},tokio_cron_scheduler=warn,hyper=warn,reqwest=warn",
            level.as_str()
        ))
    })
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM=dev:inode`).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// Install the global subscriber. Call once, early in `main`.
pub fn init(level: LogLevel, format: LogFormat) -> LogHandle {
    let (filter_layer, handle) = reload::Layer::new(filter(level));
    let registry = tracing_subscriber::registry().with(filter_layer);
    let layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_timer(Rfc3339)
            .with_writer(lines::Stderr)
            .boxed(),
        LogFormat::Text if stderr_is_journal() => match Journald::connect() {
            Some(journald) => journald.boxed(),
            None => tracing_subscriber::fmt::layer()
                .event_format(PriorityPrefix(
                    format::format()
                        .without_time()
                        .with_ansi(false)
                        .with_target(false),
                ))
                .fmt_fields(TextFields)
                .with_ansi(false)
                .with_writer(lines::Stderr)
                .boxed(),
        },
        LogFormat::Text if std::io::stderr().is_terminal() => tracing_subscriber::fmt::layer()
            .with_ansi(true)
            .with_target(false)
            .with_timer(Rfc3339)
            .fmt_fields(TextFields)
            .with_writer(lines::Stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(Plain)
            .fmt_fields(TextFields)
            .with_ansi(false)
            .with_writer(lines::Stderr)
            .boxed(),
    };
    let _ = registry.with(layer).try_init();
    LogHandle(handle)
}

/// The sd-daemon / journald priority of a level: what `journalctl -p` filters on.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether a field carries unix seconds: by convention its name ends in `_at`, as the
/// database's time columns do.
fn is_unix_time(field: &Field) -> bool {
    field.name().ends_with("_at")
}

/// Log times: RFC 3339, UTC, milliseconds (`2026-12-02T02:10:11.123Z`).
struct Rfc3339;

impl FormatTime for Rfc3339 {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = chrono::Utc::now();
        w.write_str(&now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }
}

/// The uncoloured line, `2026-12-02T02:10:11.123Z  INFO message key=value…`: what tracing's
/// default format writes (tokend opens no spans and hides targets), with the time's text up to
/// the second made once a second per thread rather than for every line.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write_time(&mut writer)?;
        writer.write_str(match *event.metadata().level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// [`Rfc3339`]'s text, its seconds part kept per thread.
fn write_time(w: &mut Writer<'_>) -> fmt::Result {
    write_time_at(w, chrono::Utc::now())
}

fn write_time_at(w: &mut Writer<'_>, now: chrono::DateTime<chrono::Utc>) -> fmt::Result {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let (secs, millis) = (now.timestamp(), now.timestamp_subsec_millis().min(999));
    SECOND.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = now.format("%Y-%m-%dT%H:%M:%S").to_string();
        }
        write!(w, "{text}.{millis:03}Z")
    })
}

/// The default field format (`message key=value …`), with unix-time fields as RFC 3339.
pub struct TextFields;

impl<'a> MakeVisitor<Writer<'a>> for TextFields {
    type Visitor = TextVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> TextVisitor<'a> {
        TextVisitor {
            writer: target,
            empty: true,
            result: Ok(()),
        }
    }
}

/// Writes what tracing's `DefaultVisitor` writes. Without colours (stderr that is not a
/// terminal, the journal's `MESSAGE`) the common fields are written here directly, which costs
/// a third of what the styled path does on every audit line; colours, messages that need
/// escaping and errors go through `DefaultVisitor` itself, one field at a time.
pub struct TextVisitor<'a> {
    writer: Writer<'a>,
    empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    fn record_time(&mut self, field: &Field, t: i64) {
        self.record_debug(field, &format_args!("{}", rfc3339(t)));
    }

    /// Nothing more to write: an earlier write failed, or the field is `log` crate metadata
    /// (which `DefaultVisitor` leaves out too).
    fn skip(&self, field: &Field) -> bool {
        self.result.is_err() || field.name().starts_with("log.")
    }

    /// tracing's own visitor, for one field of this line.
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.empty);
        record(&mut v);
        self.result = v.finish();
        self.empty = false;
    }

    fn pad(&mut self) -> fmt::Result {
        if self.empty {
            self.empty = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// ` name=value`, as `DefaultVisitor` writes it without colours.
    fn plain(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self.pad().and_then(|()| {
            self.writer.write_str(name)?;
            self.writer.write_char('=')?;
            write!(self.writer, "{value:?}")
        });
    }
}

/// What tracing escapes in a message (terminal control characters).
fn needs_escape(c: char) -> bool {
    matches!(c, '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f') || ('\u{80}'..='\u{9f}').contains(&c)
}

impl Visit for TextVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if is_unix_time(field) {
            self.record_time(field, value)
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(t) if is_unix_time(field) => self.record_time(field, t),
            _ => self.record_debug(field, &value),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.skip(field) {
            return;
        }
        let styled = self.writer.has_ansi_escapes();
        if field.name() == "message" {
            if styled || value.chars().any(needs_escape) {
                self.delegate(|v| v.record_str(field, value));
            } else {
                self.result = self.pad().and_then(|()| self.writer.write_str(value));
            }
        } else if styled {
            self.delegate(|v| v.record_str(field, value));
        } else {
            self.plain(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.skip(field) {
            self.delegate(|v| v.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.skip(field) {
            return;
        }
        if self.writer.has_ansi_escapes() || field.name() == "message" {
            self.delegate(|v| v.record_debug(field, value));
        } else {
            self.plain(field, value);
        }
    }
}

impl VisitOutput<fmt::Result> for TextVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for TextVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// The default format behind an sd-daemon priority prefix.
struct PriorityPrefix(Format<format::Full, ()>);

impl<S, N> FormatEvent<S, N> for PriorityPrefix
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Sends each event to journald as one entry with its fields (the native protocol:
/// <https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>).
///
/// Not `tracing-journald`: its `MESSAGE` is the bare message ("refresh"), so `journalctl -u
/// tokend` would lose the account, outcome and latency it shows today, and it has no way to
/// change that. This layer writes the readable line as `MESSAGE` and the fields beside it.
struct Journald {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Journald {
    /// Connect to the journal's socket (`$TOKEND_JOURNAL_SOCKET`, for tests, replaces its
    /// path); `None` when nothing listens there.
    fn connect() -> Option<Journald> {
        let path = std::env::var_os("TOKEND_JOURNAL_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(JOURNAL_SOCKET));
        let socket = UnixDatagram::unbound().ok()?;
        // Never block the daemon on a journal that does not keep up: such an entry goes to
        // stderr (the journal's stream) instead.
        socket.set_nonblocking(true).ok()?;
        // journald ignores an empty datagram; the send fails if nobody listens.
        socket.send_to(&[], &path).ok()?;
        Some(Journald { socket, path })
    }
}

impl<S: Subscriber> Layer<S> for Journald {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let priority = priority(meta.level());
        let mut line = format!("{:>5} ", meta.level());
        let _ = TextFields.format_fields(Writer::new(&mut line), event);

        let mut entry = Vec::with_capacity(256 + line.len());
        put(&mut entry, "PRIORITY", priority.to_string().as_bytes());
        put(&mut entry, "SYSLOG_IDENTIFIER", b"tokend");
        put(&mut entry, "MESSAGE", line.trim_start().as_bytes());
        if let Some(file) = meta.file() {
            put(&mut entry, "CODE_FILE", file.as_bytes());
        }
        if let Some(n) = meta.line() {
            put(&mut entry, "CODE_LINE", n.to_string().as_bytes());
        }
        event.record(&mut JournalFields(&mut entry));
        if self.socket.send_to(&entry, &self.path).is_err() {
            lines::put(format!("<{priority}>{line}\n").as_bytes(), priority <= 4);
        }
    }
}

/// The event's fields as `TOKEND_<NAME>` entries (the message is in `MESSAGE` already).
struct JournalFields<'a>(&'a mut Vec<u8>);

impl Visit for JournalFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() != "message" {
            put(self.0, &journal_name(field.name()), value.as_bytes());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() != "message" {
            put(
                self.0,
                &journal_name(field.name()),
                format!("{value:?}").as_bytes(),
            );
        }
    }
}

/// `account_id` → `TOKEND_ACCOUNT_ID`: upper case, anything but letters and digits as `_`.
fn journal_name(field: &str) -> String {
    let mut name = String::with_capacity(7 + field.len());
    name.push_str("TOKEND_");
    name.extend(field.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// One field of a native-protocol entry: `NAME=value\n`, or, when the value holds a newline,
/// `NAME\n`, its length as 64-bit little endian, the value and `\n`.
fn put(entry: &mut Vec<u8>, name: &str, value: &[u8]) {
    entry.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_fields_are_upper_case_and_prefixed() {
        assert_eq!(journal_name("account_id"), "TOKEND_ACCOUNT_ID");
        assert_eq!(journal_name("latency_ms"), "TOKEND_LATENCY_MS");
        assert_eq!(journal_name("a.b"), "TOKEND_A_B");
    }

    #[test]
    fn multi_line_values_are_length_prefixed() {
        let mut e = Vec::new();
        put(&mut e, "MESSAGE", b"one line");
        put(&mut e, "TOKEND_ERROR", b"two\nlines");
        let mut want = b"MESSAGE=one line\nTOKEND_ERROR\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(e, want);
    }

    #[test]
    fn unix_time_fields_read_as_rfc3339_in_text() {
        let out = TestWriter::default();
        let captured = out.0.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(TextFields)
            .without_time()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                next_action_at = 1_795_875_310_i64,
                latency_ms = 12_u64,
                "refresh"
            );
        });
        let text = String::from_utf8(captured.lock().expect("lock").clone()).expect("utf8");
        assert!(
            text.contains("refresh next_action_at=2026-11-28T14:15:10Z latency_ms=12"),
            "{text}"
        );
    }

    /// `Plain` writes what tracing's default format wrote before it (the format operators'
    /// tools already parse), time aside.
    #[test]
    fn plain_lines_read_as_the_default_format() {
        fn line(plain: bool) -> String {
            let out = TestWriter::default();
            let captured = out.0.clone();
            let builder = tracing_subscriber::fmt()
                .fmt_fields(TextFields)
                .with_max_level(Level::TRACE)
                .with_writer(move || out.clone());
            let emit = || {
                tracing::info!(
                    account_id = "user-1",
                    next_action_at = 1_795_875_310_i64,
                    "refresh"
                );
                tracing::warn!(error = "boom", "refresh failed");
                tracing::error!(error = "worse", "store failed");
                tracing::debug!(n = 3_u64, ok = true, "debug");
                tracing::trace!("trace");
            };
            if plain {
                let s = builder.with_ansi(false).event_format(Plain).finish();
                tracing::subscriber::with_default(s, emit);
            } else {
                let s = builder
                    .with_ansi(false)
                    .with_target(false)
                    .with_timer(Rfc3339)
                    .finish();
                tracing::subscriber::with_default(s, emit);
            }
            String::from_utf8(captured.lock().expect("lock").clone()).expect("utf8")
        }
        let (plain, default) = (line(true), line(false));
        let times =
            |text: &str| -> Vec<String> { text.lines().map(|l| l[..24].to_owned()).collect() };
        let rest =
            |text: &str| -> Vec<String> { text.lines().map(|l| l[24..].to_owned()).collect() };
        assert_eq!(rest(&plain), rest(&default));
        assert_eq!(rest(&plain).len(), 5, "{plain}");
        for t in times(&plain) {
            assert!(
                chrono::DateTime::parse_from_rfc3339(&t).is_ok()
                    && t.ends_with('Z')
                    && t.len() == 24,
                "{t}"
            );
        }
    }

    /// `TextFields` writes what tracing's `DefaultFields` writes (but for `…_at` times), with
    /// colours and without, for every kind of field.
    #[test]
    fn text_fields_write_what_the_default_fields_write() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        fn lines(ours: bool, ansi: bool) -> String {
            let out = TestWriter::default();
            let captured = out.0.clone();
            let builder = tracing_subscriber::fmt()
                .without_time()
                .with_ansi(ansi)
                .with_max_level(Level::TRACE)
                .with_writer(move || out.clone());
            let emit = || {
                let inner = std::io::Error::other("disk full");
                let outer = Outer(std::io::Error::other("inner cause"));
                tracing::info!(
                    a = "quoted \"x\"\nand a newline",
                    n = -3_i64,
                    u = 7_u64,
                    f = 1.5_f64,
                    b = true,
                    d = %"display",
                    g = ?vec![1, 2],
                    r#type = "keyword",
                    "log.target" = "skipped",
                    "message here"
                );
                tracing::warn!("a message with \x1b[31m an escape \u{9b} and DEL \x7f");
                tracing::info!(count = 3, "formatted {} message", 5);
                tracing::error!(
                    error = &inner as &(dyn std::error::Error + 'static),
                    "failed"
                );
                tracing::error!(
                    error = &outer as &(dyn std::error::Error + 'static),
                    "failed"
                );
                tracing::debug!("log.file" = "x", "log.line" = 3_u64, "only log fields");
                tracing::info!("");
                tracing::info!(message = "a str message", n = 1_u64);
                tracing::info!(message = "a str message with \x1b[1m an escape");
            };
            if ours {
                tracing::subscriber::with_default(builder.fmt_fields(TextFields).finish(), emit);
            } else {
                tracing::subscriber::with_default(builder.finish(), emit);
            }
            String::from_utf8(captured.lock().expect("lock").clone()).expect("utf8")
        }
        for ansi in [false, true] {
            let (ours, theirs) = (lines(true, ansi), lines(false, ansi));
            assert_eq!(ours, theirs, "ansi {ansi}");
            assert_eq!(ours.lines().count(), 9, "{ours}");
        }
        assert!(lines(true, false).contains("type=\"keyword\""));
    }

    /// The per-second text is made again when the second changes, also across minutes and
    /// days, and reads as `Rfc3339` would write it.
    #[test]
    fn line_times_follow_the_clock_across_seconds() {
        let base = chrono::DateTime::from_timestamp(1_795_910_399, 998_000_000).expect("time");
        for ms in [0, 1, 2, 3, 500, 1_002, 60_002, 86_400_000, 86_400_000] {
            let t = base + chrono::Duration::milliseconds(ms);
            let mut text = String::new();
            write_time_at(&mut Writer::new(&mut text), t).expect("write");
            assert_eq!(
                text,
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "{ms} ms after the base"
            );
        }
    }

    #[derive(Clone, Default)]
    struct TestWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for TestWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
