//! Pinned picks: a client that names an instance (`ROUTE @<id>` on a TCP
//! listener, `X-Squire-Instance: <id>` on HTTP) reaches exactly that
//! instance or is refused with the reason; it never falls back to another
//! one, so the answer of a room directory is honoured or visibly fails.

use super::Snapshot;

/// Why a pinned pick found no endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinRefusal {
    /// No instance of that id in the upstream's discovered set.
    Unknown,
    /// The instance is known but takes no new traffic now: the reason.
    Unavailable(&'static str),
}

impl PinRefusal {
    /// The `reason` label of the refusal counters.
    pub fn reason(self) -> &'static str {
        match self {
            PinRefusal::Unknown => "pinned_unknown",
            PinRefusal::Unavailable(_) => "pinned_unavailable",
        }
    }
}

/// The endpoint index of instance `id` in `snapshot` if it may take a new
/// connection at `now`: routable (not standby), weight above zero, not
/// ejected. Panic mode does not apply: a pin asks for one instance, whose
/// state is known. Nor does the full rule: a pinned client is one of the
/// players the instance's load counts, coming back to its room.
pub fn pick(snapshot: &Snapshot, id: &str, now: u64) -> Result<usize, PinRefusal> {
    let Some(index) = snapshot.position(id) else {
        return Err(if snapshot.discovered(id) {
            PinRefusal::Unavailable("filtered out, draining or refused by the endpoint policy")
        } else {
            PinRefusal::Unknown
        });
    };
    let endpoint = &snapshot.endpoints()[index];
    if index >= snapshot.len() {
        return Err(PinRefusal::Unavailable("not healthy"));
    }
    if endpoint.instance.weight == 0 {
        return Err(PinRefusal::Unavailable("weight 0"));
    }
    if endpoint.stats.is_ejected(now) {
        return Err(PinRefusal::Unavailable("ejected"));
    }
    Ok(index)
}
