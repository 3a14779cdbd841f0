//! Last known good: each service's last published instances, kept on disk
//! so a squire restarted while every registry is down still routes.
//!
//! One file per service, `{state_dir}/{service}.json`:
//!
//! ```json
//! {"version":1,"service":"battle","listed_at":"2026-12-02T05:00:00.123Z",
//!  "instances":[{"name":"battle","id":"battle-1","host":"10.0.0.5","port":8001,...}]}
//! ```
//!
//! Written atomically (a temp file in the same directory, fsync, rename,
//! fsync of the directory), so a crash leaves the old file or the new one,
//! never half of one. A file that is missing, truncated, of another format
//! version or of another service is not used. Files of services this squire
//! does not discover are never touched.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics as m;
use crate::registry::Instance;

/// The `version` this squire writes and the only one it reads.
pub const FORMAT_VERSION: u64 = 1;

/// What one file holds: a service's instances and when a registry gave them.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub instances: Vec<Instance>,
    pub listed_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u64,
    service: String,
    /// RFC 3339, as the admin API shows times.
    listed_at: String,
    instances: Vec<Instance>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a snapshot: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} has format version {found}; this squire reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The snapshot file of one service.
#[derive(Debug)]
pub struct LastKnown {
    dir: PathBuf,
    service: String,
}

impl LastKnown {
    pub fn new(dir: &Path, service: &str) -> LastKnown {
        LastKnown {
            dir: dir.to_owned(),
            service: service.to_owned(),
        }
    }

    /// `{dir}/{service}.json`. Service names are validated to letters,
    /// digits and `- _ . :` and never start with `.`, so this is one plain
    /// file name and never collides with a temp file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.service))
    }

    /// The snapshot on disk; `None` when there is no file.
    pub fn load(&self) -> Result<Option<Snapshot>, SnapshotError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Read { path, source }),
        };
        self.decode(&bytes).map(Some)
    }

    /// Decodes the bytes of this service's file. The file may be anything a
    /// crash, a full disk or another program left, so this is a fuzz target
    /// ([`crate::fuzzing`]).
    pub fn decode(&self, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let path = self.path();
        let malformed = |reason: String| SnapshotError::Malformed {
            path: path.clone(),
            reason,
        };
        // The version first: a later format may not parse as this one.
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        match value.get("version") {
            Some(v) if v.as_u64() == Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(SnapshotError::Version {
                    path: path.clone(),
                    found: v.to_string(),
                })
            }
            None => return Err(malformed("no \"version\"".to_owned())),
        }
        let file: OnDisk = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
        if file.service != self.service {
            return Err(malformed(format!("it is for service {:?}", file.service)));
        }
        let listed_at = humantime::parse_rfc3339(&file.listed_at)
            .map_err(|e| malformed(format!("listed_at: {e}")))?;
        if let Some(bad) = file
            .instances
            .iter()
            // Host and port are checked as an instance is read.
            .find(|i| i.name != self.service)
        {
            return Err(malformed(format!("unusable instance {:?}", bad.id)));
        }
        Ok(Snapshot {
            instances: file.instances,
            listed_at,
        })
    }

    /// Replaces the file with `snapshot`, atomically; creates the directory
    /// if needed.
    pub fn save(&self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let path = self.path();
        let write = |source| SnapshotError::Write {
            path: path.clone(),
            source,
        };
        let json = self.encode(snapshot).map_err(write)?;
        fs::create_dir_all(&self.dir).map_err(write)?;
        // Unique per process and write: two squires sharing the directory
        // never write the same temp file; the last rename wins.
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let temp = self.dir.join(format!(
            ".{}.json.{}.{}.tmp",
            self.service,
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut out = File::create(&temp)?;
            out.write_all(&json)?;
            out.sync_all()?;
            fs::rename(&temp, &path)?;
            // The rename itself survives a power cut once the directory is
            // synced.
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            // Best effort: the temp file may not exist, and a leftover one is
            // only a few bytes that no reader looks at.
            let _ = fs::remove_file(&temp);
        }
        written.map_err(write)
    }

    /// The bytes [`save`](Self::save) writes: what [`decode`](Self::decode)
    /// reads back (with `listed_at` to the millisecond).
    pub fn encode(&self, snapshot: &Snapshot) -> io::Result<Vec<u8>> {
        let file = OnDisk {
            version: FORMAT_VERSION,
            service: self.service.clone(),
            listed_at: humantime::format_rfc3339_millis(snapshot.listed_at).to_string(),
            instances: snapshot.instances.clone(),
        };
        Ok(serde_json::to_vec(&file)?)
    }
}

/// How long shutdown waits for the last snapshot write.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes the snapshots handed to it, one at a time and off the async
/// threads, so a slow disk never holds up the watch loop; when several
/// arrive during one write only the latest is written.
pub struct Writer {
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(last_known: Arc<LastKnown>) -> Writer {
        let (tx, mut rx) = watch::channel(None::<Arc<Snapshot>>);
        let task = tokio::spawn(async move {
            // Also yields a value sent just before the sender was dropped.
            while rx.changed().await.is_ok() {
                let Some(snapshot) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let file = last_known.clone();
                let saved = tokio::task::spawn_blocking(move || file.save(&snapshot)).await;
                let service = last_known.service.clone();
                match saved {
                    Ok(Ok(())) => {
                        metrics::counter!(m::SNAPSHOT_WRITES, "service" => service).increment(1);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%service, error = %e, "cannot save the last known endpoints");
                        metrics::counter!(m::SNAPSHOT_FAILURES, "service" => service, "op" => "save")
                            .increment(1);
                    }
                    Err(e) => {
                        tracing::error!(%service, error = %e, "snapshot write task failed");
                    }
                }
            }
        });
        Writer { tx, task }
    }

    /// Hands `snapshot` to the writer; returns at once.
    pub fn save(&self, snapshot: Snapshot) {
        self.tx.send_replace(Some(Arc::new(snapshot)));
    }

    /// Writes what is pending (bounded by [`FLUSH_TIMEOUT`]) and stops.
    pub async fn finish(self) {
        let Writer { tx, mut task } = self;
        drop(tx);
        if tokio::time::timeout(FLUSH_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?FLUSH_TIMEOUT,
                "the last snapshot write is still pending; not waiting for it"
            );
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::tests::instance;

    fn snapshot() -> Snapshot {
        Snapshot {
            instances: vec![instance("svc-1", 8001), instance("svc-2", 8002)],
            // Milliseconds: what the file keeps.
            listed_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_651_600_123),
        }
    }

    #[test]
    fn a_saved_snapshot_loads_back_and_no_temp_file_remains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = LastKnown::new(&dir.path().join("new/sub"), "svc");
        assert!(file.load().expect("no file is fine").is_none());
        file.save(&snapshot()).expect("save");
        assert_eq!(file.load().expect("load"), Some(snapshot()));
        let text = fs::read_to_string(file.path()).expect("read");
        assert!(
            text.starts_with(r#"{"version":1,"service":"svc","listed_at":"2025-12-02T05:00:00.123Z","instances":[{"name":"svc","id":"svc-1","host":"127.0.0.1","port":8001,"#),
            "{text}"
        );
        let names: Vec<_> = fs::read_dir(dir.path().join("new/sub"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["svc.json"]);
        // Replaced whole.
        let one = Snapshot {
            instances: vec![instance("svc-3", 8003)],
            ..snapshot()
        };
        file.save(&one).expect("save again");
        assert_eq!(file.load().expect("load"), Some(one));
    }

    #[test]
    fn truncated_foreign_and_mismatched_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = LastKnown::new(dir.path(), "svc");
        file.save(&snapshot()).expect("save");
        let good = fs::read_to_string(file.path()).expect("read");
        let cases = [
            (good[..good.len() / 2].to_owned(), "not a snapshot"),
            (String::new(), "not a snapshot"),
            (
                good.replace(r#""version":1"#, r#""version":2"#),
                "format version 2",
            ),
            (good.replace(r#""version":1,"#, ""), "no \"version\""),
            (
                good.replace(r#""service":"svc""#, r#""service":"gate""#),
                "for service \"gate\"",
            ),
            (
                good.replace(r#""port":8001"#, r#""port":0"#),
                "host and port must be set",
            ),
            (
                good.replace(
                    r#""name":"svc","id":"svc-1""#,
                    r#""name":"gate","id":"svc-1""#,
                ),
                "unusable instance",
            ),
            (good.replace("2025-12-02T", "yesterday "), "listed_at"),
        ];
        for (text, expected) in cases {
            fs::write(file.path(), &text).expect("write");
            let error = file.load().expect_err(&text).to_string();
            assert!(error.contains(expected), "{error} for {text}");
        }
    }

    #[tokio::test]
    async fn the_writer_writes_the_latest_and_flushes_on_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(LastKnown::new(dir.path(), "svc"));
        let writer = Writer::start(file.clone());
        writer.save(snapshot());
        let last = Snapshot {
            instances: vec![instance("svc-9", 8009)],
            ..snapshot()
        };
        writer.save(last.clone());
        writer.finish().await;
        assert_eq!(file.load().expect("load"), Some(last));
    }
}
