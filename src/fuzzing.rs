//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, see the
//! README's Testing section): one function per decoder of untrusted bytes.
//!
//! Each takes raw bytes, runs the decoder the agent runs on them and checks
//! what must hold of any input, panicking when it does not (a panic is what
//! the fuzzer reports: the `expect`s here are such checks). Malformed input
//! is expected and ignored; only a panic, a hang or a broken round-trip is a
//! finding. The decoders return whether the input was accepted, so the
//! properties in `tests/properties.rs` can tell a checked round-trip from a
//! rejected input. Nothing here is used by the agent itself.
//!
//! - [`config`]: `agent.toml` parsing and validation ([`Config::from_toml`]).
//! - [`instance`]: a registry value, as etcd and the local registry hold it
//!   ([`Instance::from_json`]); a decoded instance must round-trip.
//! - [`consul_health`]: a `/v1/health/service` answer from Consul.
//! - [`eureka_applications`]: a `GET /apps` or `/apps/delta` answer from
//!   Eureka, applied to a copy as the poller does.
//! - [`local_entry`]: one file of the local registry's directory.
//! - [`last_known`]: a last-known-good snapshot file.
//! - [`preamble`]: the `ROUTE <key>\n` line, read in arbitrary chunks.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::UNIX_EPOCH;

use futures_util::FutureExt;
use tokio::io::{AsyncRead, ReadBuf};

use crate::config::Config;
use crate::discovery::last_known::LastKnown;
use crate::proxy::preamble::{self, PreambleError};
use crate::registry::{consul, eureka, local, Instance};

/// Parses and validates `bytes` as `agent.toml`; every problem's text is
/// rendered too (it must name the field without panicking).
pub fn config(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            let _ = format!("{config:?}");
            true
        }
        Err(error) => {
            let _ = error.to_string();
            false
        }
    }
}

/// Decodes a registry value; one that decodes must encode to a value that
/// decodes to the same instance.
pub fn instance(bytes: &[u8]) -> bool {
    let Ok(instance) = Instance::from_json(bytes) else {
        return false;
    };
    let again = Instance::from_json(instance.to_json().as_bytes());
    assert_eq!(again.as_ref(), Ok(&instance), "round-trip");
    let _ = instance.authority();
    true
}

/// Decodes a Consul health answer; every entry is an instance or a reason.
pub fn consul_health(bytes: &[u8]) -> bool {
    let Ok(entries) = consul::wire::health_entries(bytes) else {
        return false;
    };
    for entry in entries {
        if let Ok(instance) = entry.value {
            assert!(!instance.host.is_empty() && instance.port != 0);
            assert!(instance.weight > 0);
        }
    }
    true
}

/// Decodes a Eureka applications answer, then applies it as a full fetch
/// and as a delta to that copy, as the poller does: every usable instance
/// has a host and a port, and the copy's hash code is computed.
pub fn eureka_applications(bytes: &[u8]) -> bool {
    let Ok((fetched, _hash)) = eureka::wire::applications(bytes) else {
        return false;
    };
    for f in &fetched {
        if let Ok(instance) = &f.instance {
            assert!(!instance.host.is_empty() && instance.port != 0);
            assert_eq!(instance.name, f.app.to_ascii_lowercase());
        }
    }
    let Ok((again, _)) = eureka::wire::applications(bytes) else {
        unreachable!("the same bytes decoded once")
    };
    let mut copy = eureka::wire::Apps::from_fetch(fetched);
    copy.apply(again);
    let _ = copy.hash_code();
    true
}

/// Decodes one local registry file; a decoded entry must round-trip through
/// the encoder the registrant uses.
pub fn local_entry(bytes: &[u8]) -> bool {
    let Ok((expires_at_ms, Ok(instance))) = local::decode_entry(bytes) else {
        return false;
    };
    let encoded = local::encode_entry(expires_at_ms, &instance).expect("encodes");
    let (again_at, again) = local::decode_entry(&encoded).expect("decodes");
    assert_eq!((again_at, again.as_ref()), (expires_at_ms, Ok(&instance)));
    true
}

/// Decodes a snapshot file of service `svc`; a decoded snapshot must save
/// and load back (to the millisecond).
pub fn last_known(bytes: &[u8]) -> bool {
    let file = LastKnown::new(Path::new("/nonexistent"), "svc");
    let Ok(snapshot) = file.decode(bytes) else {
        return false;
    };
    let encoded = file.encode(&snapshot).expect("encodes");
    let again = file.decode(&encoded).expect("decodes what it encodes");
    assert_eq!(again.instances, snapshot.instances);
    let millis = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    };
    assert_eq!(millis(again.listed_at), millis(snapshot.listed_at));
    true
}

/// Reads a `ROUTE` line from `bytes[2..]`, delivered in chunks whose sizes
/// come from `bytes[0]`, with a limit from `bytes[1]`; checks the result
/// against the bytes: the key is the line's, the rest follows the line.
pub fn preamble(bytes: &[u8]) -> bool {
    let [chunking, max, input @ ..] = bytes else {
        return false;
    };
    let max = usize::from(*max) + 1;
    let mut reader = Chunked {
        data: input,
        step: usize::from(*chunking % 7) + 1,
    };
    let read = preamble::read(&mut reader, max)
        .now_or_never()
        .expect("a reader that is always ready never makes read wait");
    let newline = input.iter().take(max).position(|&b| b == b'\n');
    let accepted = read.is_ok();
    match (read, newline) {
        (Ok(found), Some(at)) => {
            let expected = preamble::parse(&input[..at]).expect("parsed once");
            assert_eq!(found.key.as_deref(), expected);
            if let Some(key) = &found.key {
                assert!(!key.is_empty() && !key.contains(&b'\n'));
            }
            assert!(input[at + 1..].starts_with(&found.rest), "rest follows");
            assert!(at + 1 + found.rest.len() <= max, "reads at most max");
        }
        (Err(PreambleError::NotRoute), Some(at)) => {
            assert!(preamble::parse(&input[..at]).is_err());
        }
        (Err(PreambleError::TooLong { max: m }), None) => {
            assert_eq!(m, max);
            assert!(input.len() >= max);
        }
        (Err(PreambleError::Closed), None) => assert!(input.len() < max),
        (other, newline) => panic!("{other:?} for a newline at {newline:?}"),
    }
    accepted
}

/// An [`AsyncRead`] that hands out `data` at most `step` bytes at a time,
/// always at once.
struct Chunked<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.step.min(buf.remaining()).min(self.data.len());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds in `fuzz/seeds` go through every entry point, so a seed
    /// that stops being valid input, or a target that panics on one, shows
    /// up in `cargo test` too.
    #[test]
    fn every_seed_passes() {
        type Target = fn(&[u8]) -> bool;
        let targets: [(&str, Target); 7] = [
            ("config", config),
            ("instance", instance),
            ("consul_health", consul_health),
            ("eureka_applications", eureka_applications),
            ("local_entry", local_entry),
            ("last_known", last_known),
            ("preamble", preamble),
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (name, target) in targets {
            let dir = root.join(name);
            let mut seen = 0;
            for file in std::fs::read_dir(&dir).expect("seed dir") {
                let path = file.expect("entry").path();
                let bytes = std::fs::read(&path).expect("seed");
                let accepted = target(&bytes);
                // Seeds named `bad-*`, `invalid-*`, ... are refused on
                // purpose; the others are valid input.
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let refused = ["bad-", "invalid-", "future", "not-", "too-"]
                    .iter()
                    .any(|p| name.starts_with(p));
                assert_eq!(accepted, !refused, "{}", path.display());
                seen += 1;
            }
            assert!(seen > 0, "no seeds in {}", dir.display());
        }
    }
}
