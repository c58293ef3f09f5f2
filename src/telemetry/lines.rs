//! The daemon's log lines on stderr, written in batches.
//!
//! Every token fetch writes an audit line, tens of thousands a second under load; one `write`
//! each (and stderr's lock) cost more than the fetch itself. While the daemon runs, lines below
//! WARN wait in memory for at most [`FLUSH_EVERY`] (or until [`HIGH_WATER`] bytes wait) and go
//! out together; a WARN or ERROR line goes out at once, behind every line before it, so the
//! order on stderr is the order of the events. The daemon writes what waits before it exits
//! (any exit: returning, a second stop signal, a panic), so only a `kill -9` or a crash of the
//! machine can lose lines: those of the last [`FLUSH_EVERY`] below WARN.
//!
//! Outside the daemon (the CLI's commands, tests), nothing waits: every line is written at once.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The longest a line below WARN waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

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
    /// Whether a flusher runs; until one does, every line is written at once.
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these leaves only bytes behind: keep logging.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
        if urgent || pending.len() >= HIGH_WATER {
            self.write_out(pending);
        } else if first {
            self.arrived.notify_one();
        }
    }

    /// Write every line waiting.
    pub(crate) fn flush(&self) {
        self.write_out(lock(&self.pending));
    }

    fn write_out(&self, mut pending: MutexGuard<'_, Vec<u8>>) {
        if pending.is_empty() {
            return;
        }
        let _writing = lock(&self.writing);
        let spare = Vec::with_capacity(pending.capacity());
        let batch = std::mem::replace(&mut *pending, spare);
        drop(pending);
        (self.sink)(&batch);
    }

    /// Wait for a line, give the batch [`FLUSH_EVERY`] to fill, write it; forever.
    fn flusher(&'static self) {
        loop {
            let mut pending = lock(&self.pending);
            while pending.is_empty() {
                pending = self
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            drop(pending);
            std::thread::sleep(FLUSH_EVERY);
            self.flush();
        }
    }

    /// Start batching (once; later calls do nothing). `false` when the flusher's thread could
    /// not start: lines are then written at once, as before.
    pub(crate) fn start(&'static self) -> bool {
        self.starting.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("tokend-log".into())
                .spawn(move || self.flusher());
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

/// Batch the daemon's stderr lines from now on (see the module's documentation).
pub fn batch() -> bool {
    STDERR.start()
}

/// Write every stderr line waiting; call before anything else writes to stderr directly and
/// before the process exits.
pub fn flush() {
    STDERR.flush()
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

    static SEEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn record(bytes: &[u8]) {
        WRITES.fetch_add(1, Ordering::SeqCst);
        lock(&SEEN).extend_from_slice(bytes);
    }

    static LINES: Lines = Lines::new(record);

    fn seen() -> String {
        String::from_utf8(lock(&SEEN).clone()).expect("utf8")
    }

    /// One test for the one static sink: lines before batching, batched lines, an urgent one,
    /// the flusher's bound and the high-water mark, in that order.
    #[test]
    fn lines_wait_at_most_their_bound_and_keep_their_order() {
        LINES.put(b"before\n", false);
        assert_eq!(seen(), "before\n", "not batching yet: written at once");

        assert!(LINES.start());
        let writes = WRITES.load(Ordering::SeqCst);
        LINES.put(b"one\n", false);
        LINES.put(b"two\n", false);
        LINES.put(b"warn\n", true);
        assert_eq!(
            seen(),
            "before\none\ntwo\nwarn\n",
            "an urgent line takes the others along"
        );
        assert_eq!(WRITES.load(Ordering::SeqCst), writes + 1, "in one write");

        LINES.put(b"three\n", false);
        let deadline = std::time::Instant::now() + FLUSH_EVERY * 40;
        while !seen().ends_with("three\n") {
            assert!(
                std::time::Instant::now() < deadline,
                "the flusher never wrote the waiting line"
            );
            std::thread::yield_now();
        }

        // The flusher sleeps FLUSH_EVERY after a batch's first line; these take microseconds.
        let before = seen().len();
        let line = vec![b'x'; 1023];
        for _ in 0..=(HIGH_WATER / 1023) {
            LINES.put(&line, false);
        }
        assert!(
            seen().len() >= before + HIGH_WATER,
            "past the high-water mark the line that crosses it writes the batch"
        );
        LINES.flush();
        assert_eq!(lock(&LINES.pending).len(), 0);
    }
}
