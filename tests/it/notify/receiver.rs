//! Webhook receivers for the notification tests, each checking `Tokend-Signature` with its own
//! implementation: [`Receiver`], in process on 127.0.0.1:0, computes HMAC-SHA256 by hand from
//! `ring::digest` (tokend signs with `ring::hmac`) and reads time from the test's clock, so it
//! follows the paused clock; [`PyReceiver`] is Python's `hmac` module in a script, the README's
//! verification code, for tests of the real binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tokend::clock::Clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How old a signature's timestamp may be (either way), as the README recommends.
pub const TOLERANCE: i64 = 300;

/// HMAC-SHA256 (RFC 2104) from SHA-256 alone.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use ring::digest::{SHA256, digest};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(digest(&SHA256, key).as_ref());
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let mut inner = pad(0x36);
    inner.extend_from_slice(message);
    let inner = digest(&SHA256, &inner);
    let mut outer = pad(0x5c);
    outer.extend_from_slice(inner.as_ref());
    digest(&SHA256, &outer).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check a `Tokend-Signature` value for `body` at unix time `now`: what a receiver does.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64) -> Result<i64, String> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1.push(x.to_owned()),
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let expected = hex(&hmac_sha256(secret, &signed));
    if !v1.contains(&expected) {
        return Err("bad signature".into());
    }
    if (now - t).abs() > TOLERANCE {
        return Err(format!("timestamp {t} is {}s from now", now - t));
    }
    Ok(t)
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Down: the connection is closed before the request is read.
    Down,
    /// Answer with this status (a bad signature gets 400 whatever the mode).
    Status(u16),
}

/// One request, as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub kind: String,
    pub signature: String,
    pub body: String,
    pub verified: Result<i64, String>,
    pub status: u16,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("the body is JSON")
    }
}

struct State {
    mode: Mode,
    seen: Vec<Seen>,
    /// Connections closed unread while down.
    refused: usize,
    /// Answer the next request about this account with this status and `Retry-After` (once).
    fail_next: Vec<(String, u16, u64)>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    secret: Vec<u8>,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    pub async fn start(secret: &str, clock: Clock) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Status(200),
            seen: Vec::new(),
            refused: 0,
            fail_next: Vec::new(),
        }));
        let (st, key) = (state.clone(), secret.as_bytes().to_vec());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (st, key, clock) = (st.clone(), key.clone(), clock.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, &st, &key, &clock).await;
                });
            }
        });
        Receiver {
            addr,
            secret: secret.as_bytes().to_vec(),
            state,
        }
    }

    /// A URL with a path and a query, as real webhook URLs have.
    pub fn url(&self) -> String {
        format!("http://{}/hooks/tokend?channel=ops", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().expect("lock").mode = mode;
    }

    /// Answer the next request about `account` with `status` and `Retry-After: retry_after`.
    pub fn fail_next(&self, account: &str, status: u16, retry_after: u64) {
        self.state
            .lock()
            .expect("lock")
            .fail_next
            .push((account.to_owned(), status, retry_after));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("lock").seen.clone()
    }

    pub fn refused(&self) -> usize {
        self.state.lock().expect("lock").refused
    }

    /// Requests answered 2xx with a valid signature.
    pub fn delivered(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| (200..300).contains(&s.status) && s.verified.is_ok())
            .collect()
    }

    /// Send a request as tokend would (for replays and forgeries); returns the status.
    pub async fn post(&self, id: &str, signature: &str, body: &str) -> u16 {
        reqwest::Client::new()
            .post(self.url())
            .header("Tokend-Event-Id", id)
            .header("Tokend-Signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }
}

/// One request per connection (`Connection: close`).
async fn serve(
    mut sock: tokio::net::TcpStream,
    state: &Mutex<State>,
    key: &[u8],
    clock: &Clock,
) -> std::io::Result<()> {
    let mode = state.lock().expect("lock").mode;
    if mode == Mode::Down {
        state.lock().expect("lock").refused += 1;
        return Ok(());
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..(head_end + len).min(buf.len())];
    let signature = header("tokend-signature");
    let verified = verify(key, &signature, body, clock.now());
    let account = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|b| b["account_id"].as_str().map(str::to_owned));
    let mut retry_after = None;
    let mut status = match (mode, &verified) {
        (_, Err(_)) => 400,
        (Mode::Status(s), Ok(_)) => s,
        (Mode::Down, Ok(_)) => unreachable!("answered above"),
    };
    {
        let mut st = state.lock().expect("lock");
        if let Some(i) = st
            .fail_next
            .iter()
            .position(|(a, _, _)| Some(a) == account.as_ref())
        {
            let (_, s, after) = st.fail_next.remove(i);
            status = s;
            retry_after = Some(after);
        }
    }
    state.lock().expect("lock").seen.push(Seen {
        id: header("tokend-event-id"),
        kind: header("tokend-event-type"),
        signature,
        body: String::from_utf8_lossy(body).into_owned(),
        verified,
        status,
    });
    let extra = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    let answer =
        format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
    sock.write_all(answer.as_bytes()).await?;
    sock.shutdown().await
}

/// A receiver around the README's `verify` (taken from README.md, so the documented code is the
/// tested code): answers with the status written in a file (200 when it is missing) and logs
/// every request as a JSON line.
const PY_RECEIVER: &str = r#"
import http.server, json, os, sys

SECRET = os.environ["TOKEND_WEBHOOK_SECRET"].encode()
LOG, STATUS = sys.argv[1], sys.argv[2]

class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            verify(SECRET, self.headers.get("Tokend-Signature", ""), body)
            problem = None
        except Exception as e:
            problem = str(e)
        try:
            code = int(open(STATUS).read().strip())
        except (FileNotFoundError, ValueError):
            code = 200
        if problem:
            code = 400
        with open(LOG, "a") as f:
            f.write(json.dumps({"id": self.headers.get("Tokend-Event-Id"), "code": code,
                                "problem": problem, "body": body.decode()}) + "\n")
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

pub struct PyReceiver {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    status: PathBuf,
}

impl PyReceiver {
    pub fn start(dir: &Path, secret: &str) -> PyReceiver {
        let script = dir.join("receiver.py");
        std::fs::write(&script, readme_verify() + PY_RECEIVER).expect("script");
        let log = dir.join("received.jsonl");
        let status = dir.join("receiver-status");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&log)
            .arg(&status)
            .env("TOKEND_WEBHOOK_SECRET", secret)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port");
        let port = line.trim().parse().expect("the receiver prints its port");
        PyReceiver {
            child,
            port,
            log,
            status,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn answer(&self, status: u16) {
        std::fs::write(&self.status, status.to_string()).expect("status");
    }

    /// Every request logged: `{id, code, problem, body}`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The Python code block of the README that defines `verify`.
fn readme_verify() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    readme
        .split("```python\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(code, _)| code))
        .find(|code| code.contains("def verify("))
        .expect("the README shows a Python verify()")
        .to_owned()
}

impl Drop for PyReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
