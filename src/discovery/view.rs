//! [`View`]: what one registry says of a service, kept by registry key,
//! with malformed entries skipped and counted once.

use std::collections::{BTreeMap, HashMap};

use crate::metrics as m;
use crate::registry::{Change, Entry, Instance, WatchEvent};

/// What one registry says of the service.
#[derive(Default)]
pub(super) struct View {
    /// Instances by registry key.
    pub(super) known: BTreeMap<String, Instance>,
    /// Keys whose value did not parse, with the reason: each is logged and
    /// counted once, not again on every re-list.
    malformed: HashMap<String, String>,
}

impl View {
    pub(super) fn apply(&mut self, event: WatchEvent, service: &str) {
        match event {
            WatchEvent::Reset(entries) => {
                let previous = std::mem::take(&mut self.malformed);
                self.known.clear();
                for entry in entries {
                    let reason = previous.get(&entry.key).cloned();
                    self.put(entry, reason, service);
                }
            }
            WatchEvent::Changes(changes) => {
                for change in changes {
                    match change {
                        Change::Put(entry) => {
                            let reason = self.malformed.remove(&entry.key);
                            self.put(entry, reason, service);
                        }
                        Change::Delete { key } => {
                            self.known.remove(&key);
                            self.malformed.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// Takes in one entry. A value that cannot be used is skipped, and logged
    /// and counted unless it was already skipped for the same reason.
    fn put(&mut self, entry: Entry, skipped_before: Option<String>, service: &str) {
        let reason = match entry.value {
            Ok(instance) if instance.name == service => {
                self.known.insert(entry.key, instance);
                return;
            }
            Ok(instance) => format!("names service {:?}", instance.name),
            Err(reason) => reason,
        };
        self.known.remove(&entry.key);
        if skipped_before.as_ref() != Some(&reason) {
            tracing::warn!(service, key = %entry.key, %reason, "skipping a malformed registry entry");
            metrics::counter!(m::ENTRIES_SKIPPED, "service" => service.to_owned()).increment(1);
        }
        self.malformed.insert(entry.key, reason);
    }
}
