//! One service's node: its children listed and watched, each child's data
//! read and watched, every watch re-armed by the read that follows its
//! event (ZooKeeper's watches fire once).
//!
//! A change of the session's state ends the watch with `Unavailable`: the
//! client would re-set the watches itself on reconnect, but what changed
//! while it was cut off is only certain from a new listing, so the caller
//! lists again (and keeps its last snapshot until that succeeds).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{FuturesUnordered, StreamExt};
use zookeeper_client::{Client, EventType, StateWatcher, WatchedEvent};

use super::error::map_error;
use crate::registry::{Change, Entry, Instance, RegistryError, Watch, WatchEvent};

type Fired = Pin<Box<dyn Future<Output = WatchedEvent> + Send>>;
type ChildFired = Pin<Box<dyn Future<Output = (String, WatchedEvent)> + Send>>;

pub(super) struct ZooKeeperWatch {
    client: Client,
    /// `{root}/{service}`.
    dir: String,
    timeout: Duration,
    state: StateWatcher,
    initial: Option<Vec<Entry>>,
    /// The children whose data we hold, by name.
    known: BTreeSet<String>,
    /// The children watch (or, while the service's node does not exist,
    /// the watch of its creation).
    children: Fired,
    /// One data watch per known child.
    data: FuturesUnordered<ChildFired>,
    /// The children watch fired (and is spent): list again.
    relist_due: bool,
    /// Children whose data watch fired: read them again.
    reread_due: BTreeSet<String>,
}

impl ZooKeeperWatch {
    /// Lists the service and reads every child, setting the watches.
    pub async fn open(
        client: Client,
        dir: String,
        timeout: Duration,
    ) -> Result<ZooKeeperWatch, RegistryError> {
        let state = client.state_watcher();
        let (names, children) = list(&client, &dir, timeout).await?;
        let mut watch = ZooKeeperWatch {
            client,
            dir,
            timeout,
            state,
            initial: None,
            known: BTreeSet::new(),
            children,
            data: FuturesUnordered::new(),
            relist_due: false,
            reread_due: BTreeSet::new(),
        };
        let entries = watch.read_new(names).await?;
        watch.initial = Some(entries);
        Ok(watch)
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{}", self.dir, name)
    }

    /// Reads `names` at once (the requests are pipelined), watching each;
    /// those deleted meanwhile are left out.
    async fn read_new(&mut self, names: Vec<String>) -> Result<Vec<Entry>, RegistryError> {
        let paths: Vec<String> = names.iter().map(|name| self.path(name)).collect();
        let reads = paths
            .iter()
            .map(|path| self.client.get_and_watch_data(path))
            .collect::<Vec<_>>();
        let read = tokio::time::timeout(self.timeout, futures_util::future::join_all(reads))
            .await
            .map_err(|_| unanswered(self.timeout))?;
        let mut entries = Vec::new();
        for ((name, path), result) in names.into_iter().zip(paths).zip(read) {
            match result {
                Ok((data, _, watcher)) => {
                    entries.push(Entry {
                        key: path,
                        value: Instance::from_json(&data),
                    });
                    self.watch_data(name, watcher);
                }
                Err(zookeeper_client::Error::NoNode) => {}
                Err(e) => return Err(map_error(e)),
            }
        }
        Ok(entries)
    }

    fn watch_data(&mut self, name: String, watcher: zookeeper_client::OneshotWatcher) {
        self.known.insert(name.clone());
        self.data
            .push(Box::pin(async move { (name, watcher.changed().await) }));
    }

    /// Lists the children again (re-arming the watch): puts for the new,
    /// deletes for the gone.
    async fn relist(&mut self) -> Result<Vec<Change>, RegistryError> {
        let (names, children) = list(&self.client, &self.dir, self.timeout).await?;
        self.children = children;
        let now: BTreeSet<String> = names.into_iter().collect();
        let gone: Vec<String> = self.known.difference(&now).cloned().collect();
        let new: Vec<String> = now.difference(&self.known).cloned().collect();
        // Read before forgetting the gone, so a call cancelled here leaves
        // `known` as it was and the next listing finds the same deletes.
        let puts = self.read_new(new).await?;
        let mut changes: Vec<Change> = gone
            .into_iter()
            .map(|name| {
                self.known.remove(&name);
                Change::Delete {
                    key: self.path(&name),
                }
            })
            .collect();
        changes.extend(puts.into_iter().map(Change::Put));
        Ok(changes)
    }

    /// Reads one child again after its data watch fired.
    async fn reread(&mut self, name: String) -> Result<Vec<Change>, RegistryError> {
        let entries = self.read_new(vec![name.clone()]).await?;
        if entries.is_empty() {
            // Deleted: the children watch fires too, and finds it gone.
            return Ok(if self.known.remove(&name) {
                vec![Change::Delete {
                    key: self.path(&name),
                }]
            } else {
                Vec::new()
            });
        }
        Ok(entries.into_iter().map(Change::Put).collect())
    }
}

#[async_trait]
impl Watch for ZooKeeperWatch {
    /// Cancel-safe (discovery races it against probes and timers): a
    /// fired watch is first noted as due work, which a cancelled call
    /// leaves for the next one.
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if let Some(entries) = self.initial.take() {
            return Ok(WatchEvent::Reset(entries));
        }
        loop {
            let changes = if self.relist_due {
                let changes = self.relist().await?;
                self.relist_due = false;
                changes
            } else if let Some(name) = self.reread_due.first().cloned() {
                let changes = self.reread(name.clone()).await?;
                self.reread_due.remove(&name);
                changes
            } else {
                tokio::select! {
                    state = self.state.changed() => {
                        return Err(RegistryError::Unavailable(format!(
                            "ZooKeeper session {state}; listing again"
                        )));
                    }
                    event = &mut self.children => {
                        session_ended(&event)?;
                        self.relist_due = true;
                    }
                    Some((name, event)) = self.data.next() => {
                        session_ended(&event)?;
                        self.reread_due.insert(name);
                    }
                }
                continue;
            };
            if !changes.is_empty() {
                return Ok(WatchEvent::Changes(changes));
            }
        }
    }
}

/// A watch fired by the session, not a node: the watch ends.
fn session_ended(event: &WatchedEvent) -> Result<(), RegistryError> {
    if event.event_type == EventType::Session {
        return Err(RegistryError::Unavailable(format!(
            "ZooKeeper session {}; listing again",
            event.session_state
        )));
    }
    Ok(())
}

fn unanswered(timeout: Duration) -> RegistryError {
    RegistryError::Unavailable(format!("no answer from ZooKeeper within {timeout:?}"))
}

/// The children of `dir` and their watch; no children and a watch of its
/// creation while `dir` does not exist (no instance ever registered).
async fn list(
    client: &Client,
    dir: &str,
    timeout: Duration,
) -> Result<(Vec<String>, Fired), RegistryError> {
    // Twice at most: once more if `dir` is created between the two reads.
    for _ in 0..2 {
        let listed = tokio::time::timeout(timeout, client.get_and_watch_children(dir))
            .await
            .map_err(|_| unanswered(timeout))?;
        match listed {
            Ok((names, _, watcher)) => return Ok((names, Box::pin(watcher.changed()))),
            Err(zookeeper_client::Error::NoNode) => {}
            Err(e) => return Err(map_error(e)),
        }
        let stat = tokio::time::timeout(timeout, client.check_and_watch_stat(dir))
            .await
            .map_err(|_| unanswered(timeout))?
            .map_err(map_error)?;
        if let (None, watcher) = stat {
            return Ok((Vec::new(), Box::pin(watcher.changed())));
        }
    }
    Err(RegistryError::Unavailable(format!(
        "{dir} kept appearing and vanishing while listed"
    )))
}
