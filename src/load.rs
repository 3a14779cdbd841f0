//! The load a game process reports: players now and the most it takes.
//!
//! The game process reports it through `PUT /v1/load` (or `squire load
//! 37/100`, or a check's output with `load_from_output`); squire publishes
//! it with its registration, and the squires that route to the service read
//! it back for the `least_loaded` and `packed` strategies and for the rule
//! that a full instance (`players >= capacity`) gets no new connections.
//!
//! - A [`Load`] carries when it was reported (`at`, wall clock, the only
//!   clock two hosts share). A load older than its `load_ttl` counts as
//!   **unknown**, not as empty: a game process that hangs stops reporting,
//!   and its last "3 of 100" must not keep attracting players. Unknown is
//!   neither full nor empty (see the strategies).
//! - Publishing is a re-write of the registration value, through the
//!   registration's one token bucket, and only on a meaningful change
//!   ([`worth_publishing`]): players moved by at least 1% of capacity, the
//!   capacity changed, the instance became or stopped being full or empty,
//!   the load appeared or was cleared, or the published one is half a ttl
//!   old and a newer report came in (so it is refreshed well before peers
//!   take it as unknown). squire never refreshes a load on its own: if the
//!   game stops reporting, its load goes unknown.
//! - [`parse_fraction`] reads the CLI's `37/100`; [`from_output`] a check's
//!   output (`players=37 capacity=100`, or a JSON object with those keys).

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// How long a reported load stays meaningful by default (`service.load_ttl`
/// for what we publish, `upstream.load_ttl` for what we read).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Largest capacity accepted: far above any game server, small enough that
/// the strategies' products never overflow.
pub const MAX_CAPACITY: u32 = 1_000_000;

/// Players and capacity, as reported at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Load {
    pub players: u32,
    /// Greater than zero.
    pub capacity: u32,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*at))
}

impl Load {
    /// A load reported at `at`; the error says what is wrong with it.
    pub fn new(players: u32, capacity: u32, at: SystemTime) -> Result<Load, String> {
        if capacity == 0 {
            return Err("capacity must be greater than zero".to_owned());
        }
        if capacity > MAX_CAPACITY {
            return Err(format!("capacity must be at most {MAX_CAPACITY}"));
        }
        if players > MAX_CAPACITY {
            return Err(format!("players must be at most {MAX_CAPACITY}"));
        }
        Ok(Load {
            players,
            capacity,
            at,
        })
    }

    /// No room for one more player.
    pub fn is_full(&self) -> bool {
        self.players >= self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.players == 0
    }

    /// Whether it is still meaningful at `now`: reported at most `ttl` ago.
    /// A report from the future (clocks a little apart) is fresh.
    pub fn is_fresh(&self, now: SystemTime, ttl: Duration) -> bool {
        now.duration_since(self.at).map_or(true, |age| age <= ttl)
    }

    /// How long from `now` it stays fresh (zero once stale).
    pub fn fresh_for(&self, now: SystemTime, ttl: Duration) -> Duration {
        match now.duration_since(self.at) {
            Ok(age) => ttl.saturating_sub(age),
            Err(ahead) => ttl + ahead.duration(),
        }
    }
}

/// Whether `reported` must be written over `published` (see the module
/// doc for the rule). `ttl` is the one we publish under.
pub fn worth_publishing(published: Option<&Load>, reported: Option<&Load>, ttl: Duration) -> bool {
    match (published, reported) {
        (None, None) => false,
        (Some(_), None) | (None, Some(_)) => true,
        (Some(old), Some(new)) => {
            let moved = u64::from(old.players.abs_diff(new.players)) * 100;
            old.capacity != new.capacity
                || moved >= u64::from(new.capacity)
                || old.is_full() != new.is_full()
                || old.is_empty() != new.is_empty()
                || new
                    .at
                    .duration_since(old.at)
                    .is_ok_and(|newer| newer >= ttl / 2)
        }
    }
}

/// `37/100` (players/capacity), as `squire load` takes it.
pub fn parse_fraction(text: &str) -> Result<(u32, u32), String> {
    let (players, capacity) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not players/capacity (e.g. 37/100)"))?;
    let number = |what: &str, s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("{what} {s:?} is not a whole number"))
    };
    let players = number("players", players)?;
    let capacity = number("capacity", capacity)?;
    Load::new(players, capacity, SystemTime::UNIX_EPOCH)?;
    Ok((players, capacity))
}

/// The load in a check's output: a JSON object with `players` and
/// `capacity` numbers (from the output's first `{` to its last `}`, so an
/// http check's `HTTP 200 OK: {...}` reads too), or `players=N` and
/// `capacity=M` words anywhere in the text. `None` when neither is there
/// (or the values are invalid).
pub fn from_output(output: &str) -> Option<(u32, u32)> {
    let object = output
        .find('{')
        .zip(output.rfind('}'))
        .filter(|(start, end)| start < end)
        .map(|(start, end)| &output[start..=end]);
    if let Some(object) = object {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(object) {
            let field = |name: &str| {
                value
                    .get(name)?
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
            };
            let (players, capacity) = (field("players")?, field("capacity")?);
            return Load::new(players, capacity, SystemTime::UNIX_EPOCH)
                .ok()
                .map(|_| (players, capacity));
        }
    }
    let mut players = None;
    let mut capacity = None;
    for word in output.split_whitespace() {
        let word = word.trim_matches(|c: char| c == ',' || c == ';');
        if let Some(value) = word.strip_prefix("players=") {
            players = value.parse::<u32>().ok();
        } else if let Some(value) = word.strip_prefix("capacity=") {
            capacity = value.parse::<u32>().ok();
        }
    }
    let (players, capacity) = (players?, capacity?);
    Load::new(players, capacity, SystemTime::UNIX_EPOCH)
        .ok()
        .map(|_| (players, capacity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn load(players: u32, capacity: u32, secs: u64) -> Load {
        Load::new(players, capacity, at(secs)).expect("valid")
    }

    #[test]
    fn full_empty_and_bounds() {
        assert!(load(100, 100, 0).is_full());
        assert!(load(101, 100, 0).is_full());
        assert!(!load(99, 100, 0).is_full());
        assert!(load(0, 100, 0).is_empty());
        assert!(Load::new(1, 0, at(0)).is_err());
        assert!(Load::new(1, MAX_CAPACITY + 1, at(0)).is_err());
    }

    #[test]
    fn a_load_older_than_its_ttl_is_stale() {
        let ttl = Duration::from_secs(30);
        let l = load(3, 100, 0);
        assert!(l.is_fresh(at(30), ttl));
        assert!(!l.is_fresh(at(31), ttl));
        assert!(
            l.is_fresh(at(0) - Duration::from_secs(5), ttl),
            "from the future"
        );
        assert_eq!(l.fresh_for(at(10), ttl), Duration::from_secs(20));
        assert_eq!(l.fresh_for(at(40), ttl), Duration::ZERO);
    }

    #[test]
    fn only_meaningful_changes_are_published() {
        let ttl = Duration::from_secs(30);
        let old = load(37, 100, 0);
        let worth = |new: Load| worth_publishing(Some(&old), Some(&new), ttl);
        assert!(!worth(load(37, 100, 1)), "same numbers, soon after");
        assert!(worth(load(38, 100, 1)), "1% of capacity");
        assert!(!worth_publishing(
            Some(&load(370, 1000, 0)),
            Some(&load(379, 1000, 1)),
            ttl
        ));
        assert!(worth(load(37, 200, 1)), "capacity changed");
        assert!(worth(load(37, 100, 15)), "half a ttl old: refresh");
        assert!(worth_publishing(
            Some(&load(999, 1000, 0)),
            Some(&load(1000, 1000, 1)),
            ttl
        ));
        assert!(worth_publishing(
            Some(&load(1, 1000, 0)),
            Some(&load(0, 1000, 1)),
            ttl
        ));
        assert!(worth_publishing(None, Some(&old), ttl));
        assert!(worth_publishing(Some(&old), None, ttl));
        assert!(!worth_publishing(None, None, ttl));
    }

    #[test]
    fn fractions_and_outputs_parse() {
        assert_eq!(parse_fraction("37/100"), Ok((37, 100)));
        assert_eq!(parse_fraction(" 0 / 8 "), Ok((0, 8)));
        assert!(parse_fraction("37").is_err());
        assert!(parse_fraction("a/100").is_err());
        assert!(parse_fraction("1/0").is_err());
        assert_eq!(from_output("ok players=37 capacity=100\n"), Some((37, 100)));
        assert_eq!(
            from_output(r#"{"players": 5, "capacity": 10, "map": "dust"}"#),
            Some((5, 10))
        );
        assert_eq!(
            from_output(r#"HTTP 200 OK: {"players":1,"capacity":2}"#),
            Some((1, 2))
        );
        assert_eq!(from_output("players=5"), None);
        assert_eq!(from_output(r#"{"players": 5}"#), None);
        assert_eq!(from_output("players=5 capacity=0"), None);
        assert_eq!(from_output("all good"), None);
    }
}
