//! The daemon's log lines on stderr, written in batches.
//!
//! Every token fetch writes an audit line, tens of thousands a second under load; one `write`
//! each (and stderr's lock) cost more than the fetch itself. While the daemon runs, lines below
//! WARN wait in memory until the flusher writes them, [`FLUSH_EVERY`] after the first of a
//! batch (sooner when [`HIGH_WATER`] bytes wait), and go out together; a WARN or ERROR line goes out at once, behind every line before it, so the
//! order on stderr is the order of the events. The daemon writes what waits before it exits
//! (any exit: returning, a fatal error, a second stop signal, a panic), and from then on every
//! line at once; so only a signal tokend does not handle (SIGKILL, the watchdog's SIGABRT) or a
//! crash of the machine can lose lines: those still waiting, about the last [`FLUSH_EVERY`].
//!
//! Outside the daemon (the CLI's commands, tests), nothing waits: every line is written at once.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use tracing::{Level, Metadata};

use crate::lock;
use tracing_subscriber::fmt::MakeWriter;

/// The longest a line below WARN waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Replaces [`FLUSH_EVERY`] (milliseconds), for tests that must tell the exit's flush from the
/// flusher's.
const FLUSH_EVERY_ENV: &str = "TOKEND_LOG_FLUSH_MS";

/// Past this many bytes waiting, the line that crosses it writes them all.
const HIGH_WATER: usize = 64 * 1024;

/// Lines waiting for one sink.
pub(crate) struct Lines {
    pending: Mutex<Vec<u8>>,
    /// Wakes the flusher when the first line of a batch arrives.
    arrived: Condvar,
    /// Held while a batch is written, taken before `pending` is let go: batches reach the sink
    /// in the order they were cut.
    writing: Mutex<()>,
    /// Whether lines wait: from [`Lines::start`] until [`Lines::finish`]; otherwise every line
    /// is written at once.
    batching: AtomicBool,
    starting: Once,
    sink: fn(&[u8]),
}

fn stderr(bytes: &[u8]) {
    // Never panic from inside a log call: a closed stderr loses the lines, nothing else.
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// stderr's lines.
static STDERR: Lines = Lines::new(stderr);

impl Lines {
    pub(crate) const fn new(sink: fn(&[u8])) -> Lines {
        Lines {
            pending: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            writing: Mutex::new(()),
            batching: AtomicBool::new(false),
            starting: Once::new(),
            sink,
        }
    }

    /// Take one event's line (whole: the formatter hands it over in one piece).
    pub(crate) fn put(&self, line: &[u8], urgent: bool) {
        if !self.batching.load(Ordering::Relaxed) {
            let _writing = lock(&self.writing);
            (self.sink)(line);
            return;
        }
        let mut pending = lock(&self.pending);
        let first = pending.is_empty();
        pending.extend_from_slice(line);
        // Batching may have ended while this thread waited for the lock: then nobody would
        // write the line but this thread.
        if urgent || pending.len() >= HIGH_WATER || !self.batching.load(Ordering::Acquire) {
            self.write_out(pending);
        } else if first {
            self.arrived.notify_one();
        }
    }

    /// Write every line waiting, and wait for a batch the flusher is writing: when this
    /// returns, every line put before is on the sink.
    pub(crate) fn flush(&self) {
        self.write_out(lock(&self.pending));
    }

    /// Stop batching and write what waits: from now on every line is written at once, so
    /// nothing put after this is left behind when the process exits.
    pub(crate) fn finish(&self) {
        self.batching.store(false, Ordering::Release);
        self.flush();
    }

    fn write_out(&self, mut pending: MutexGuard<'_, Vec<u8>>) {
        // Taken even with nothing waiting: a batch cut before may still be being written.
        let _writing = lock(&self.writing);
        if pending.is_empty() {
            return;
        }
        // Not the peak's capacity forever after one huge line.
        let spare = Vec::with_capacity(pending.capacity().min(2 * HIGH_WATER));
        let batch = std::mem::replace(&mut *pending, spare);
        drop(pending);
        (self.sink)(&batch);
    }

    /// Wait for a line, give the batch `every` to fill, write it; forever.
    fn flusher(&'static self, every: Duration) {
        loop {
            let mut pending = lock(&self.pending);
            while pending.is_empty() {
                pending = self
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            drop(pending);
            std::thread::sleep(every);
            self.flush();
        }
    }

    /// Start batching (once; later calls do nothing). `false` when the flusher's thread could
    /// not start: lines are then written at once, as before.
    pub(crate) fn start(&'static self, every: Duration) -> bool {
        self.starting.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("tokend-log".into())
                .spawn(move || self.flusher(every));
            if spawned.is_err() {
                return;
            }
            self.batching.store(true, Ordering::Release);
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                self.flush();
                previous(info);
            }));
        });
        self.batching.load(Ordering::Acquire)
    }
}

/// Batch the daemon's stderr lines from now on (see the module's documentation). The returned
/// guard ends it ([`finish`]) when dropped, also while a panic unwinds: hold it for as long as
/// the daemon runs.
#[must_use = "dropping the guard ends batching at once"]
pub fn batch() -> Batching {
    let every = std::env::var(FLUSH_EVERY_ENV)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(FLUSH_EVERY, Duration::from_millis);
    STDERR.start(every);
    Batching(())
}

/// Ends batching when dropped.
pub struct Batching(());

impl Drop for Batching {
    fn drop(&mut self) {
        finish();
    }
}

/// Write every stderr line waiting; call before anything else writes to stderr directly.
pub fn flush() {
    STDERR.flush()
}

/// Stop batching and write what waits; call before the process exits.
pub fn finish() {
    STDERR.finish()
}

/// One line for stderr (whole, with its newline), as the fmt layer's would be.
pub(crate) fn put(line: &[u8], urgent: bool) {
    STDERR.put(line, urgent)
}

/// The fmt layer's writer: one event's line into [`STDERR`].
pub(crate) struct Stderr;

pub(crate) struct Line {
    urgent: bool,
}

impl std::io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        STDERR.put(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            urgent: matches!(*meta.level(), Level::ERROR | Level::WARN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    // Each test has a `Lines` of its own (a sink is a plain function, so a static each).
    static HELD_SEEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static HELD_WRITES: AtomicUsize = AtomicUsize::new(0);
    fn held_sink(bytes: &[u8]) {
        HELD_WRITES.fetch_add(1, Ordering::SeqCst);
        lock(&HELD_SEEN).extend_from_slice(bytes);
    }
    static HELD: Lines = Lines::new(held_sink);

    static PROMPT_SEEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    fn prompt_sink(bytes: &[u8]) {
        lock(&PROMPT_SEEN).extend_from_slice(bytes);
    }
    static PROMPT: Lines = Lines::new(prompt_sink);

    fn text(seen: &Mutex<Vec<u8>>) -> String {
        String::from_utf8(lock(seen).clone()).expect("utf8")
    }

    /// With a flusher that would wait an hour, only the rules write: an urgent line takes the
    /// others along in one write, the high-water mark writes the batch, a panic writes what
    /// waits, `finish` writes what waits and every line after it at once.
    #[test]
    fn urgent_lines_the_high_water_mark_a_panic_and_finish_write_everything_in_order() {
        HELD.put(b"before\n", false);
        assert_eq!(
            text(&HELD_SEEN),
            "before\n",
            "not batching yet: written at once"
        );

        assert!(HELD.start(Duration::from_secs(3600)));
        let writes = HELD_WRITES.load(Ordering::SeqCst);
        HELD.put(b"one\n", false);
        HELD.put(b"two\n", false);
        assert_eq!(text(&HELD_SEEN), "before\n", "INFO lines wait");
        HELD.put(b"warn\n", true);
        assert_eq!(text(&HELD_SEEN), "before\none\ntwo\nwarn\n");
        assert_eq!(
            HELD_WRITES.load(Ordering::SeqCst),
            writes + 1,
            "in one write"
        );

        let before = text(&HELD_SEEN).len();
        let line = [b'x'; 1023];
        for _ in 0..(HIGH_WATER / 1023) {
            HELD.put(&line, false);
        }
        assert_eq!(text(&HELD_SEEN).len(), before, "under the mark: waiting");
        HELD.put(&line, false);
        assert_eq!(
            text(&HELD_SEEN).len(),
            before + (HIGH_WATER / 1023 + 1) * 1023,
            "the line that crosses the mark writes the batch"
        );

        // A panic on any thread writes what waits before its own message.
        HELD.put(b"panicking\n", false);
        let panicked = std::panic::catch_unwind(|| panic!("a panic while lines wait"));
        assert!(panicked.is_err());
        assert!(
            text(&HELD_SEEN).ends_with("panicking\n"),
            "the panic hook did not write the waiting line"
        );

        HELD.put(b"three\n", false);
        HELD.finish();
        assert!(
            text(&HELD_SEEN).ends_with("three\n"),
            "finish writes what waits"
        );
        HELD.put(b"after\n", false);
        assert!(
            text(&HELD_SEEN).ends_with("three\nafter\n"),
            "after finish, written at once"
        );
        assert_eq!(lock(&HELD.pending).len(), 0);
    }

    /// The flusher writes a waiting line by itself (after `FLUSH_EVERY`; the deadline here is
    /// loose, for a loaded machine).
    #[test]
    fn the_flusher_writes_a_waiting_line_without_being_asked() {
        assert!(PROMPT.start(FLUSH_EVERY));
        PROMPT.put(b"waits\n", false);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !text(&PROMPT_SEEN).ends_with("waits\n") {
            assert!(
                std::time::Instant::now() < deadline,
                "the flusher never wrote the waiting line"
            );
            std::thread::yield_now();
        }
    }
}
