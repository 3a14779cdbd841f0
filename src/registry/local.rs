//! The embedded registry: no server, instances are files in a directory that
//! the squires on one host share.
//!
//! Layout: `{dir}/{service}/{id}.json`, each file holding the instance and the
//! time its lease ends. The registrant rewrites its file every ttl/3 (write to
//! a temp file, then rename, so readers never see half a file). Readers skip
//! entries past their end, and delete those stale for a further ttl (a squire
//! that crashed). A watch wakes on inotify events for the service directory
//! and also rescans on a timer, so expiry is seen without any event and a
//! directory where inotify is unavailable still works.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{Entry, Instance, Lease, Registry, RegistryError, Watch, WatchEvent};

/// The longest a watch waits before rescanning without an event.
const MAX_RESCAN: Duration = Duration::from_secs(1);

pub struct LocalRegistry {
    dir: PathBuf,
    ttl: Duration,
}

/// What one file holds.
#[derive(Serialize, Deserialize)]
struct Record {
    /// Milliseconds since the Unix epoch after which the entry is gone.
    expires_at_ms: u64,
    instance: serde_json::Value,
}

impl LocalRegistry {
    pub fn new(dir: PathBuf, ttl: Duration) -> Self {
        LocalRegistry { dir, ttl }
    }

    fn service_dir(&self, service: &str) -> PathBuf {
        self.dir.join(service)
    }
}

#[async_trait]
impl Registry for LocalRegistry {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn target(&self) -> String {
        self.dir.display().to_string()
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        let dir = self.service_dir(&instance.name);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_error(&dir))?;
        let lease = LocalLease {
            path: dir.join(format!("{}.json", instance.id)),
            instance: instance.clone(),
            ttl: self.ttl,
        };
        lease.write().await?;
        Ok(Box::new(lease))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        let dir = self.service_dir(service);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_error(&dir))?;
        let changed = Arc::new(Notify::new());
        let wake = changed.clone();
        // Only changes wake the watch: our own scans open the directory and
        // its files, and an access event waking a scan would make it spin.
        let on_event = move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| e.kind.is_access()) {
                return;
            }
            wake.notify_one();
        };
        let watcher = notify::recommended_watcher(on_event).and_then(|mut w| {
            w.watch(&dir, RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "inotify unavailable; polling the registry directory");
                None
            }
        };
        Ok(Box::new(LocalWatch {
            dir,
            rescan: (self.ttl / 3).min(MAX_RESCAN),
            grace: self.ttl,
            changed,
            _watcher: watcher,
            last: None,
        }))
    }
}

struct LocalLease {
    path: PathBuf,
    instance: Instance,
    ttl: Duration,
}

impl LocalLease {
    async fn write(&self) -> Result<(), RegistryError> {
        let record = Record {
            expires_at_ms: now_ms() + self.ttl.as_millis() as u64,
            instance: serde_json::to_value(&self.instance)
                .map_err(|e| RegistryError::Rejected(e.to_string()))?,
        };
        let bytes =
            serde_json::to_vec(&record).map_err(|e| RegistryError::Rejected(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(io_error(&tmp))?;
        tokio::fs::rename(&tmp, &self.path)
            .await
            .map_err(io_error(&self.path))
    }
}

#[async_trait]
impl Lease for LocalLease {
    fn id(&self) -> String {
        self.path.display().to_string()
    }

    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        // A file that is gone was expired and reaped by a reader (we were
        // stalled past the ttl) or removed by hand: like an etcd lease that
        // ran out, the registration must be made again.
        if !tokio::fs::try_exists(&self.path).await.unwrap_or(false) {
            return Err(RegistryError::LeaseLost(format!(
                "{} is gone",
                self.path.display()
            )));
        }
        self.write().await
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        self.instance = instance.clone();
        self.write().await
    }

    async fn revoke(self: Box<Self>) -> Result<(), RegistryError> {
        match tokio::fs::remove_file(&self.path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&self.path)(e)),
            _ => Ok(()),
        }
    }
}

struct LocalWatch {
    dir: PathBuf,
    rescan: Duration,
    grace: Duration,
    changed: Arc<Notify>,
    /// Kept alive for as long as the watch: dropping it stops the events.
    _watcher: Option<notify::RecommendedWatcher>,
    last: Option<Vec<Entry>>,
}

#[async_trait]
impl Watch for LocalWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        loop {
            let (entries, next_expiry) = scan(&self.dir, self.grace).await?;
            if self.last.as_ref() != Some(&entries) {
                self.last = Some(entries.clone());
                return Ok(WatchEvent::Reset(entries));
            }
            let wait = next_expiry.map_or(self.rescan, |at| at.min(self.rescan));
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Reads every live entry of a service directory, sorted by key, and how long
/// until the first of them expires.
async fn scan(
    dir: &Path,
    grace: Duration,
) -> Result<(Vec<Entry>, Option<Duration>), RegistryError> {
    let mut entries = Vec::new();
    let mut next_expiry: Option<u64> = None;
    let now = now_ms();
    let mut listing = tokio::fs::read_dir(dir).await.map_err(io_error(dir))?;
    while let Some(file) = listing.next_entry().await.map_err(io_error(dir))? {
        let path = file.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue; // temp files of a write in progress
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => return Err(io_error(&path)(e)),
        };
        let key = path.display().to_string();
        let record: Record = match serde_json::from_slice(&bytes) {
            Ok(record) => record,
            Err(e) => {
                entries.push(Entry {
                    key,
                    value: Err(e.to_string()),
                });
                continue;
            }
        };
        if record.expires_at_ms <= now {
            if now - record.expires_at_ms > grace.as_millis() as u64 {
                // Racing readers may both try; either removal is fine.
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    tracing::debug!(path = %path.display(), error = %e, "reaping a stale entry failed");
                }
            }
            continue;
        }
        next_expiry =
            Some(next_expiry.map_or(record.expires_at_ms, |t| t.min(record.expires_at_ms)));
        let value = serde_json::to_vec(&record.instance)
            .map_err(|e| e.to_string())
            .and_then(|json| Instance::from_json(&json));
        entries.push(Entry { key, value });
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let until = next_expiry.map(|at| Duration::from_millis(at.saturating_sub(now) + 1));
    Ok((entries, until))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> RegistryError + '_ {
    move |e| RegistryError::Unavailable(format!("{}: {e}", path.display()))
}
