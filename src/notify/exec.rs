//! `kind = "exec"`: run a command (no shell) with the JSON body on standard input and the
//! `TOKEND_EVENT_*` variables. The command gets an otherwise empty environment apart from
//! `PATH` (tokend's own may hold a client secret), runs in its own process group, and the whole
//! group is killed when it outlives the sink's timeout. Exit 0 delivered, 65 rejected, anything
//! else retried (see [`super::policy::exit_verdict`]).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::event;
use super::policy::{Verdict, exit_verdict};
use crate::store::Delivery;

/// How much of the command's standard error is kept for the error message.
const STDERR_KEPT: u64 = 4096;
/// After the command exits, how long its standard error may stay open (a background child
/// holding it) before tokend stops reading.
const STDERR_GRACE: Duration = Duration::from_millis(500);
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// One attempt: run `command` for `d`.
pub async fn run(
    command: &[String],
    d: &Delivery,
    body: &str,
    timeout: Duration,
    abort: &CancellationToken,
) -> Verdict {
    let Some((program, args)) = command.split_first() else {
        return Verdict::Retry {
            error: "no command".into(),
            after: None,
        };
    };
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", path)
        .envs(event::env(d))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Verdict::Retry {
                error: format!("cannot start {program}: {e}"),
                after: None,
            };
        }
    };
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let kill_group = || {
        if let Some(pid) = group {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    };
    let stdin = child.stdin.take();
    let body = body.as_bytes().to_vec();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input is not an error.
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        }
    };
    let mut stderr = child.stderr.take();
    let (err_tx, err_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(STDERR_KEPT).read_to_end(&mut kept).await;
        }
        let _ = err_tx.send(kept);
    });
    let work = async {
        let (_, status) = tokio::join!(feed, child.wait());
        status
    };
    let status = tokio::select! {
        r = tokio::time::timeout(timeout, work) => r,
        _ = abort.cancelled() => {
            kill_group();
            return Verdict::Retry { error: "interrupted by shutdown".into(), after: None };
        }
    };
    let status = match status {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            kill_group();
            return Verdict::Retry {
                error: format!("{program}: {e}"),
                after: None,
            };
        }
        Err(_) => {
            kill_group();
            return Verdict::Retry {
                error: format!(
                    "{program} did not finish within {}; killed",
                    humantime::format_duration(timeout)
                ),
                after: None,
            };
        }
    };
    let stderr = tokio::time::timeout(STDERR_GRACE, err_rx)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let said = last_line(&stderr);
    match exit_verdict(status.code()) {
        Verdict::Delivered => Verdict::Delivered,
        Verdict::Rejected(e) => Verdict::Rejected(with(&e, program, &said)),
        Verdict::Retry { error, after } => {
            use std::os::unix::process::ExitStatusExt;
            let error = match status.signal() {
                Some(sig) => format!("killed by signal {sig}"),
                None => error,
            };
            Verdict::Retry {
                error: with(&error, program, &said),
                after,
            }
        }
    }
}

fn with(what: &str, program: &str, said: &str) -> String {
    if said.is_empty() {
        format!("{program}: {what}")
    } else {
        format!("{program}: {what}: {said}")
    }
}

/// The last non-empty line of the command's standard error, at most 200 characters.
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    line.trim().chars().take(200).collect()
}
