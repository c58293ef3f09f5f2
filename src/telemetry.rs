//! Logging: tracing to stderr in one of three shapes.
//!
//! - Under systemd (`$JOURNAL_STREAM` names stderr's device and inode): no timestamps, no colour,
//!   each line prefixed with its syslog priority (`<3>` error ... `<7>` debug), so
//!   `journalctl -p warning` filters correctly.
//! - `log_format = "json"`: one JSON object a line, for log shippers.
//! - Otherwise the usual readable format, coloured only on a terminal.
//!
//! The level can change at run time (SIGHUP reload) through [`LogHandle`].

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format::Format};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, reload, util::SubscriberInitExt};

use crate::config::{LogFormat, LogLevel};

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
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if stderr_is_journal() => tracing_subscriber::fmt::layer()
            .event_format(JournalFormat(
                format::format()
                    .without_time()
                    .with_ansi(false)
                    .with_target(false),
            ))
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = registry.with(fmt_layer).try_init();
    LogHandle(handle)
}

/// The default format behind an sd-daemon priority prefix.
struct JournalFormat(Format<format::Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalFormat
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
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
