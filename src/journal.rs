//! The recovery journal: rotated pairs the store could not take, kept durably beside the
//! database until it can.
//!
//! A pair the provider rotated exists nowhere else: under strict rotation, losing it loses the
//! grant. When a commit fails (a lock, a full disk, a replaced file), the pair is appended here
//! at once (fsync'd, file mode 0600); the next start replays every record before anything else,
//! writing each pair only where the account still holds the refresh token that was presented
//! (a SHA-256 of it is recorded, not the token).
//!
//! The file keeps a zero-filled reserve written at open, and records overwrite the reserve, so
//! appending needs no new disk blocks: on ext4, XFS and tmpfs a journal record can be written
//! on a disk that is full (on copy-on-write filesystems, btrfs or ZFS, it may not).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use secrecy::{ExposeSecret, SecretString};

/// Bytes kept in reserve (a record is ~400 bytes: room for ~2,500 pairs).
const RESERVE: u64 = 1 << 20;

/// One rotated pair waiting to be stored.
#[derive(Clone)]
pub struct Record {
    pub account: String,
    /// Hex SHA-256 of the refresh token that was presented for this pair.
    pub presented_sha256: String,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub scopes: Option<String>,
    /// When the provider answered.
    pub at: i64,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("account", &self.account)
            .field("expires_at", &self.expires_at)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    account: String,
    presented_sha256: String,
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_at: Option<i64>,
    scopes: Option<String>,
    at: i64,
}

/// Hex SHA-256 of a token.
pub fn digest(token: &SecretString) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.expose_secret().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

struct Inner {
    file: File,
    /// Where the next record goes (the first zero byte).
    end: u64,
    /// Records appended and not yet settled by a commit.
    outstanding: usize,
}

pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl Journal {
    /// The journal of the database at `db`.
    pub fn path_for(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push(".recovery");
        PathBuf::from(p)
    }

    /// Open (creating, 0600) the journal beside `db` and make sure its reserve is on disk.
    pub fn open(db: &Path) -> std::io::Result<Journal> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = Journal::path_for(db);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let mut content = Vec::new();
        file.read_to_end(&mut content)?;
        let mut end = content
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(content.len()) as u64;
        // A record torn by a crash mid-write is cut off, so the next one starts on its own line.
        let whole = content[..end as usize]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i as u64 + 1);
        if whole < end {
            file.seek(SeekFrom::Start(whole))?;
            file.write_all(&vec![0u8; (end - whole) as usize])?;
            file.sync_data()?;
            end = whole;
        }
        let len = content.len() as u64;
        if len < end + RESERVE {
            file.seek(SeekFrom::Start(len))?;
            let zeros = vec![0u8; (end + RESERVE - len) as usize];
            file.write_all(&zeros)?;
            file.sync_all()?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(Journal {
            path,
            inner: Mutex::new(Inner {
                file,
                end,
                outstanding: 0,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every record in the journal (left by a previous run, or appended by this one).
    pub fn records(&self) -> std::io::Result<Vec<Record>> {
        let mut g = self.lock();
        let end = g.end;
        let mut buf = vec![0u8; end as usize];
        g.file.seek(SeekFrom::Start(0))?;
        g.file.read_exact(&mut buf)?;
        let mut out = Vec::new();
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // A torn last line (a crash mid-write) is skipped: its commit never happened either.
            let Ok(l) = serde_json::from_slice::<Line>(line) else {
                continue;
            };
            out.push(Record {
                account: l.account,
                presented_sha256: l.presented_sha256,
                access_token: l.access_token.map(SecretString::from),
                refresh_token: l.refresh_token.map(SecretString::from),
                expires_at: l.expires_at,
                scopes: l.scopes,
                at: l.at,
            });
        }
        Ok(out)
    }

    /// Append one record and make it durable before returning.
    pub fn append(&self, r: &Record) -> std::io::Result<()> {
        let line = Line {
            account: r.account.clone(),
            presented_sha256: r.presented_sha256.clone(),
            access_token: r
                .access_token
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
            refresh_token: r
                .refresh_token
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
            expires_at: r.expires_at,
            scopes: r.scopes.clone(),
            at: r.at,
        };
        let mut bytes = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let mut g = self.lock();
        let at = g.end;
        g.file.seek(SeekFrom::Start(at))?;
        g.file.write_all(&bytes)?;
        g.file.sync_data()?;
        g.end = at + bytes.len() as u64;
        g.outstanding += 1;
        Ok(())
    }

    /// A journaled pair reached the store: when none is outstanding, empty the journal.
    pub fn settled(&self) {
        let mut g = self.lock();
        g.outstanding = g.outstanding.saturating_sub(1);
        if g.outstanding == 0
            && let Err(e) = clear(&mut g)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot empty the recovery journal (its records will be replayed harmlessly)");
        }
    }

    /// Records appended by this process and not yet stored.
    pub fn outstanding(&self) -> usize {
        self.lock().outstanding
    }

    /// Empty the journal (after a replay stored or settled every record).
    pub fn clear(&self) -> std::io::Result<()> {
        let mut g = self.lock();
        g.outstanding = 0;
        clear(&mut g)
    }
}

fn clear(g: &mut Inner) -> std::io::Result<()> {
    if g.end == 0 {
        return Ok(());
    }
    g.file.seek(SeekFrom::Start(0))?;
    g.file.write_all(&vec![0u8; g.end as usize])?;
    g.file.sync_data()?;
    g.end = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            account: id.into(),
            presented_sha256: digest(&SecretString::from("old")),
            access_token: Some(SecretString::from("a2")),
            refresh_token: Some(SecretString::from("r2")),
            expires_at: Some(100),
            scopes: None,
            at: 50,
        }
    }

    #[test]
    fn records_survive_reopening_and_clear_empties() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("t.db");
        let j = Journal::open(&db).expect("open");
        j.append(&record("a")).expect("append");
        j.append(&record("b")).expect("append");
        drop(j);
        let j = Journal::open(&db).expect("reopen");
        let r = j.records().expect("records");
        assert_eq!(
            r.iter().map(|r| r.account.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            r[0].refresh_token.as_ref().map(|s| s.expose_secret()),
            Some("r2")
        );
        assert!(!format!("{:?}", r[0]).contains("r2"), "Debug shows a token");
        let mode = std::fs::metadata(j.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::metadata(j.path()).expect("meta").len() >= RESERVE);
        j.clear().expect("clear");
        assert!(j.records().expect("records").is_empty());
        j.append(&record("c")).expect("append");
        j.settled();
        assert!(j.records().expect("records").is_empty(), "settled empties");
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("t.db");
        let j = Journal::open(&db).expect("open");
        j.append(&record("a")).expect("append");
        drop(j);
        let path = Journal::path_for(&db);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let text = std::fs::read(&path).expect("read");
        let end = text.iter().position(|b| *b == 0).expect("zero");
        f.seek(SeekFrom::Start(end as u64)).expect("seek");
        f.write_all(br#"{"account":"b","presen"#).expect("write");
        drop(f);
        let j = Journal::open(&db).expect("reopen");
        assert_eq!(j.records().expect("records").len(), 1);
        j.append(&record("c")).expect("append");
        let ids: Vec<String> = j
            .records()
            .expect("records")
            .into_iter()
            .map(|r| r.account)
            .collect();
        assert_eq!(ids, ["a", "c"], "a record after a torn one is readable");
    }
}
