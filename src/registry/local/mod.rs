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
//!
//! The directory is a door into the fleet (whoever writes a file in it
//! takes traffic), so squire trusts it only when it is safe: it creates it
//! 0700 (0750 with `group`, whose members may read but not write), refuses
//! one not owned by its own user or writable by group or others, writes its
//! file through a temp file opened `O_CREAT|O_EXCL|O_NOFOLLOW`, and reads
//! entries opened `O_NOFOLLOW|O_NONBLOCK`, regular files only, at most
//! 64 KiB each. A symlink, FIFO, device, oversized or unreadable entry is
//! skipped (logged once and counted by discovery), never fatal to the scan.
//! Temp files left by a crashed writer are removed after a ttl.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::{Entry, Instance, Lease, Registry, RegistryError, Watch, WatchEvent};

/// The longest a watch waits before rescanning without an event.
const MAX_RESCAN: Duration = Duration::from_secs(1);

/// The largest entry file read; a longer one is skipped.
pub const MAX_ENTRY_BYTES: u64 = 64 * 1024;

pub struct LocalRegistry {
    dir: PathBuf,
    ttl: Duration,
    /// Directories are created with this mode (0700, or 0750 with a group).
    dir_mode: u32,
    /// Files are created with this mode (0600, or 0640 with a group).
    file_mode: u32,
    /// The group given read access, if any.
    gid: Option<u32>,
}

/// What one file holds.
#[derive(Serialize, Deserialize)]
struct Record {
    /// Milliseconds since the Unix epoch after which the entry is gone.
    expires_at_ms: u64,
    instance: serde_json::Value,
}

impl LocalRegistry {
    /// Opens `dir`, creating it (and its parents) if needed, and checks
    /// that it can be trusted: owned by squire's user, writable by no one
    /// else. `group` may read it. The error says what is wrong and how to
    /// fix it.
    pub fn open(dir: PathBuf, group: Option<&str>, ttl: Duration) -> Result<Self, String> {
        let gid = group.map(group_id).transpose()?;
        let (dir_mode, file_mode) = if gid.is_some() {
            (0o750, 0o640)
        } else {
            (0o700, 0o600)
        };
        let registry = LocalRegistry {
            dir,
            ttl,
            dir_mode,
            file_mode,
            gid,
        };
        let dir = &registry.dir;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        registry
            .create_dir(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        trusted(dir)?;
        Ok(registry)
    }

    fn service_dir(&self, service: &str) -> PathBuf {
        self.dir.join(service)
    }

    /// Creates `dir` with the registry's mode and group; an existing one is
    /// left as it is (the registry root was checked at open, and only its
    /// owner can create anything inside it).
    fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
        match std::fs::DirBuilder::new().mode(self.dir_mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        // The umask may have taken bits away: set exactly what we want.
        std::fs::set_permissions(
            dir,
            std::os::unix::fs::PermissionsExt::from_mode(self.dir_mode),
        )?;
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(dir, None, Some(gid))?;
        }
        Ok(())
    }
}

/// Whether `dir` is safe to read instances from: a directory owned by
/// squire's user that no one else can write to.
fn trusted(dir: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by squire's user (uid {me}): another user may have \
             created it to inject instances; remove it, or set registry.dir to a directory \
             squire's user owns",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {mode:04o}): any local user could inject \
             instances; chmod 700 it (750 with registry.group)",
            dir.display()
        ));
    }
    Ok(())
}

/// The id of a group, by name.
fn group_id(name: &str) -> Result<u32, String> {
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("bad group name {name:?}"))?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives it;
    // the result is read only through `found`, which points into `group`.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!(
            "registry.group: no group named {name:?} on this host"
        ));
    }
    Ok(group.gr_gid)
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
        self.create_dir(&dir).map_err(io_error(&dir))?;
        let lease = LocalLease {
            path: dir.join(format!("{}.json", instance.id)),
            instance: instance.clone(),
            ttl: self.ttl,
            mode: self.file_mode,
            gid: self.gid,
        };
        lease.write().await?;
        Ok(Box::new(lease))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        let dir = self.service_dir(service);
        self.create_dir(&dir).map_err(io_error(&dir))?;
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
    mode: u32,
    gid: Option<u32>,
}

impl LocalLease {
    async fn write(&self) -> Result<(), RegistryError> {
        let bytes = encode_entry(now_ms() + self.ttl.as_millis() as u64, &self.instance)
            .map_err(RegistryError::Rejected)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut options = tokio::fs::OpenOptions::new();
        options
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .custom_flags(libc::O_NOFOLLOW);
        let open = || options.open(&tmp);
        let mut file = match open().await {
            // Left by a write that died half way (or planted): never
            // written through, removed and made anew.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tokio::fs::remove_file(&tmp).await.map_err(io_error(&tmp))?;
                open().await
            }
            other => other,
        }
        .map_err(io_error(&tmp))?;
        tokio::io::AsyncWriteExt::write_all(&mut file, &bytes)
            .await
            .map_err(io_error(&tmp))?;
        drop(file);
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(io_error(&tmp))?;
        }
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
        if path.to_string_lossy().ends_with(".json.tmp") {
            reap_leftover(&path, grace).await;
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let key = path.display().to_string();
        let bytes = match read_entry(&path).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue, // removed meanwhile
            Err(reason) => {
                entries.push(Entry {
                    key,
                    value: Err(reason),
                });
                continue;
            }
        };
        let (expires_at_ms, value) = match decode_entry(&bytes) {
            Ok(decoded) => decoded,
            Err(reason) => {
                entries.push(Entry {
                    key,
                    value: Err(reason),
                });
                continue;
            }
        };
        if expires_at_ms <= now {
            if now - expires_at_ms > grace.as_millis() as u64 {
                // Racing readers may both try; either removal is fine.
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    tracing::debug!(path = %path.display(), error = %e, "reaping a stale entry failed");
                }
            }
            continue;
        }
        next_expiry = Some(next_expiry.map_or(expires_at_ms, |t| t.min(expires_at_ms)));
        entries.push(Entry { key, value });
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let until = next_expiry.map(|at| Duration::from_millis(at.saturating_sub(now) + 1));
    Ok((entries, until))
}

/// The bytes of one entry file: `instance`, live until `expires_at_ms`.
pub(crate) fn encode_entry(expires_at_ms: u64, instance: &Instance) -> Result<Vec<u8>, String> {
    let record = Record {
        expires_at_ms,
        instance: serde_json::to_value(instance).map_err(|e| e.to_string())?,
    };
    serde_json::to_vec(&record).map_err(|e| e.to_string())
}

/// Decodes the bytes of one entry file: when its lease ends (ms since the
/// epoch) and the instance it holds. `Err` when it is not a record at all;
/// an instance that does not parse is the inner `Err`, kept for discovery
/// to skip and count. The bytes come from a file anyone with write access
/// to the directory may have written, so this is a fuzz target
/// ([`crate::fuzzing`]).
pub(crate) fn decode_entry(bytes: &[u8]) -> Result<(u64, Result<Instance, String>), String> {
    let record: Record = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let value = serde_json::to_vec(&record.instance)
        .map_err(|e| e.to_string())
        .and_then(|json| Instance::from_json(&json));
    Ok((record.expires_at_ms, value))
}

/// Reads one entry file safely: no symlink followed, no FIFO waited on,
/// regular files only, at most [`MAX_ENTRY_BYTES`]. `None` when it is gone.
async fn read_entry(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let opened = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .await;
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("a symbolic link: refused".into())
        }
        Err(e) => return Err(format!("cannot open: {e}")),
    };
    let meta = file
        .metadata()
        .await
        .map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file: refused".into());
    }
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_ENTRY_BYTES} an entry may have",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!(
            "more than the {MAX_ENTRY_BYTES} bytes an entry may have"
        ));
    }
    Ok(Some(bytes))
}

/// Removes a temp file older than `grace`: a writer died between writing
/// and renaming it.
async fn reap_leftover(path: &Path, grace: Duration) {
    let Ok(meta) = tokio::fs::symlink_metadata(path).await else {
        return;
    };
    let old = meta
        .modified()
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|age| age > grace);
    if old {
        if let Err(e) = tokio::fs::remove_file(path).await {
            tracing::debug!(path = %path.display(), error = %e, "removing a leftover temp file failed");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> RegistryError + '_ {
    move |e| RegistryError::Unavailable(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
