//! [`CatalogFeed`]: what `/v1/catalog/{service}` answers, one service's
//! instances as the upstreams see them, on a watch channel that blocking
//! queries wait on.
//!
//! A [`CatalogView`] is published by `endpoints` after every rebuild of the
//! service's upstreams: the instances discovery put in service whose
//! addresses the [endpoint policy](crate::balance::policy) admits (a
//! refused one is listed apart, by id and reason, never as an instance), in
//! instance-id order. Only a change of that content publishes; a rebuild
//! for a new DNS answer or new own addresses that leaves it as it was does
//! not.
//!
//! Every published view takes the next value of one process-wide counter,
//! its **index** (as Consul's `X-Consul-Index`): it starts at 1 and only
//! grows, so it never goes backwards for a client, also when a reload
//! gives the service a new [`ServiceState`](super::ServiceState) (which
//! starts from the old one's view, see [`CatalogFeed::take_over`]). A
//! restarted squire starts counting again from 1: a client holding a
//! larger index is answered at once and starts over (Consul's rule for an
//! index that goes backwards).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::balance::Refusal;
use crate::registry::Instance;

/// The last index handed out; the first view gets 1.
static INDEX: AtomicU64 = AtomicU64::new(0);

fn next_index() -> u64 {
    INDEX.fetch_add(1, Ordering::Relaxed) + 1
}

/// One service's catalog at one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogView {
    /// Greater than that of every view published before it (never 0).
    pub index: u64,
    /// The instances the endpoint policy admits, by id, whatever their
    /// status.
    pub instances: Vec<Instance>,
    /// The instances it refuses, by id: `(id, reason)`.
    pub refused: Vec<(String, Refusal)>,
}

/// Publishes a service's [`CatalogView`]s.
pub struct CatalogFeed {
    sender: watch::Sender<Arc<CatalogView>>,
}

impl Default for CatalogFeed {
    /// No instance yet, at a fresh index.
    fn default() -> Self {
        CatalogFeed {
            sender: watch::Sender::new(Arc::new(CatalogView {
                index: next_index(),
                instances: Vec::new(),
                refused: Vec::new(),
            })),
        }
    }
}

impl CatalogFeed {
    /// The view now.
    pub fn current(&self) -> Arc<CatalogView> {
        self.sender.borrow().clone()
    }

    /// Follows the views: `changed()` resolves at the next one, and fails
    /// once the service's state is gone (a reload replaced or removed it).
    pub fn subscribe(&self) -> watch::Receiver<Arc<CatalogView>> {
        self.sender.subscribe()
    }

    /// Starts from `other`'s view, index and all (a reload replaced the
    /// service's state; the upstreams still route what it shows).
    pub(super) fn take_over(&self, other: &CatalogFeed) {
        self.sender.send_replace(other.current());
    }

    /// Publishes `instances` (sorted by id) and `refused` at the next index,
    /// unless they are what is published already. Returns whether it did.
    pub(super) fn publish(
        &self,
        instances: Vec<Instance>,
        refused: Vec<(String, Refusal)>,
    ) -> bool {
        self.sender.send_if_modified(|view| {
            if view.instances == instances && view.refused == refused {
                return false;
            }
            *view = Arc::new(CatalogView {
                index: next_index(),
                instances,
                refused,
            });
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_grows_only_with_a_change_and_never_starts_at_zero() {
        let feed = CatalogFeed::default();
        let first = feed.current().index;
        assert!(first >= 1);
        assert!(!feed.publish(Vec::new(), Vec::new()), "nothing changed");
        assert_eq!(feed.current().index, first);
        assert!(feed.publish(vec![Instance::for_tests("a")], Vec::new()));
        let second = feed.current().index;
        assert!(second > first);
        assert!(!feed.publish(vec![Instance::for_tests("a")], Vec::new()));
        assert!(feed.publish(
            vec![Instance::for_tests("a")],
            vec![("b".to_owned(), Refusal::Own)]
        ));
        assert!(feed.current().index > second);
    }

    #[test]
    fn a_new_state_takes_over_the_view_and_counts_on_from_it() {
        let old = CatalogFeed::default();
        old.publish(vec![Instance::for_tests("a")], Vec::new());
        let before = old.current();
        let new = CatalogFeed::default();
        new.take_over(&old);
        assert_eq!(new.current(), before);
        new.publish(Vec::new(), Vec::new());
        assert!(new.current().index > before.index);
    }

    #[tokio::test]
    async fn a_subscriber_wakes_at_a_change_and_sees_the_feed_go() {
        let feed = CatalogFeed::default();
        let mut rx = feed.subscribe();
        rx.borrow_and_update();
        feed.publish(vec![Instance::for_tests("a")], Vec::new());
        rx.changed().await.expect("a change");
        assert_eq!(rx.borrow_and_update().instances.len(), 1);
        drop(feed);
        assert!(rx.changed().await.is_err(), "the feed is gone");
    }
}
