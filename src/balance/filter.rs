//! Which instances an upstream routes to.

use std::collections::BTreeMap;

use crate::registry::{Instance, Status};

/// Which instances an upstream may route to: the seed's
/// `discover(tags=..., healthy_only=...)`, applied once per snapshot rebuild.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// Statuses that may take new connections (default: healthy only).
    pub statuses: Vec<Status>,
    /// Every one of these tags must be on the instance.
    pub tags: Vec<String>,
    /// Exact version, or a prefix when it ends in `*` (`"1.4.*"`).
    pub version: Option<String>,
    /// Every one of these pairs must be in the instance's metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            statuses: vec![Status::Healthy],
            tags: Vec::new(),
            version: None,
            metadata: BTreeMap::new(),
        }
    }
}

impl Filter {
    /// Whether the instance may take new connections.
    pub fn admits(&self, instance: &Instance) -> bool {
        self.statuses.contains(&instance.status) && self.matches(instance)
    }

    /// Whether the instance is one this upstream is about at all (tags,
    /// version, metadata), whatever its status.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.tags.iter().all(|t| instance.tags.contains(t))
            && self
                .version
                .as_deref()
                .is_none_or(|want| match want.strip_suffix('*') {
                    Some(prefix) => instance.version.starts_with(prefix),
                    None => instance.version == want,
                })
            && self
                .metadata
                .iter()
                .all(|(k, v)| instance.metadata.get(k) == Some(v))
    }
}
