//! The `ROUTE <key>\n` line a TCP client may send first.
//!
//! On a listener with `hash_key = "preamble"` the client opens with one line
//! naming its affinity key (a room, a match, a player id), e.g.
//! `ROUTE room-42\n`; squire reads it, hashes the key to pick the instance,
//! and forwards only what follows the line. The line is bounded
//! (`preamble_max_bytes`, newline included) and must arrive within
//! `preamble_timeout`; a trailing `\r` is ignored. `ROUTE\n` (no key) asks
//! for no affinity: any endpoint will do. Anything else closes the
//! connection: a client that forgets the line would otherwise be routed at
//! random with its first bytes eaten.
//!
//! `ROUTE @<instance-id>\n` pins the connection instead: it goes to exactly
//! that instance (no hashing, no retry on another one) or is closed,
//! counted with reason `pinned_unknown` (no such instance discovered) or
//! `pinned_unavailable` (known, but not healthy, ejected, draining, filtered
//! out or weight 0). Every listener that reads the line accepts it, so a
//! room directory can answer with the instance id of the room's server.
//! Ids are compared exactly; `ROUTE @` alone is a bad line.

use tokio::io::{AsyncRead, AsyncReadExt};

const VERB: &[u8] = b"ROUTE";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreambleError {
    #[error("the client closed the connection before sending a ROUTE line")]
    Closed,
    #[error("no newline within {max} bytes")]
    TooLong { max: usize },
    #[error("the first line is not `ROUTE <key>`")]
    NotRoute,
    #[error("reading the ROUTE line failed: {0}")]
    Read(String),
}

/// What the client sent: the key (if any) and the bytes after the line,
/// which belong to the upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Preamble {
    pub key: Option<Vec<u8>>,
    pub rest: Vec<u8>,
}

/// What marks the key of a pinned `ROUTE` line.
const PIN: u8 = b'@';

impl Preamble {
    /// The instance id of a `ROUTE @<id>` line (`None` for a key or no
    /// key). An id that is not UTF-8 is kept lossily: it matches nothing.
    pub fn pinned(&self) -> Option<String> {
        let id = self.key.as_deref()?.strip_prefix(&[PIN])?;
        Some(String::from_utf8_lossy(id).into_owned())
    }
}

/// Reads one `ROUTE` line of at most `max` bytes from `reader`.
pub async fn read<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Preamble, PreambleError> {
    let mut buf = vec![0u8; max];
    let mut filled = 0;
    loop {
        let n = reader
            .read(&mut buf[filled..])
            .await
            .map_err(|e| PreambleError::Read(e.to_string()))?;
        if n == 0 {
            return Err(PreambleError::Closed);
        }
        let searched = filled;
        filled += n;
        if let Some(offset) = buf[searched..filled].iter().position(|&b| b == b'\n') {
            let end = searched + offset;
            let key = parse(&buf[..end])?.map(<[u8]>::to_vec);
            let rest = buf[end + 1..filled].to_vec();
            return Ok(Preamble { key, rest });
        }
        if filled == max {
            return Err(PreambleError::TooLong { max });
        }
    }
}

/// The key of one line (without its `\n`): `Some` for `ROUTE key`, `None`
/// for a bare `ROUTE`.
pub fn parse(line: &[u8]) -> Result<Option<&[u8]>, PreambleError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(VERB).ok_or(PreambleError::NotRoute)?;
    if rest.is_empty() {
        return Ok(None);
    }
    let key = rest
        .strip_prefix(b" ")
        .ok_or(PreambleError::NotRoute)?
        .trim_ascii();
    if key == [PIN] {
        return Err(PreambleError::NotRoute);
    }
    Ok((!key.is_empty()).then_some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(parse(b"ROUTE room-42"), Ok(Some(&b"room-42"[..])));
        assert_eq!(parse(b"ROUTE room-42\r"), Ok(Some(&b"room-42"[..])));
        assert_eq!(parse(b"ROUTE   spaced  "), Ok(Some(&b"spaced"[..])));
        assert_eq!(parse(b"ROUTE"), Ok(None));
        assert_eq!(parse(b"ROUTE "), Ok(None));
        assert_eq!(parse(b"ROUTER x"), Err(PreambleError::NotRoute));
        assert_eq!(parse(b"GET / HTTP/1.1"), Err(PreambleError::NotRoute));
        assert_eq!(parse(b"ROUTE @"), Err(PreambleError::NotRoute));
    }

    #[tokio::test]
    async fn an_at_sign_pins_an_instance() {
        let mut input: &[u8] = b"ROUTE @logic-10.0.0.5-8001\r\nhi";
        let preamble = read(&mut input, 64).await.expect("preamble");
        assert_eq!(preamble.pinned().as_deref(), Some("logic-10.0.0.5-8001"));
        assert_eq!(preamble.rest, b"hi");
        let mut keyed: &[u8] = b"ROUTE room-1\n";
        let preamble = read(&mut keyed, 64).await.expect("preamble");
        assert_eq!(preamble.pinned(), None);
    }

    #[tokio::test]
    async fn bytes_after_the_line_are_kept_for_the_upstream() {
        let mut input: &[u8] = b"ROUTE room-7\nhello";
        let preamble = read(&mut input, 64).await.expect("preamble");
        assert_eq!(preamble.key.as_deref(), Some(&b"room-7"[..]));
        assert_eq!(preamble.rest, b"hello");
    }

    #[tokio::test]
    async fn bounded_and_complete() {
        let mut long: &[u8] = b"ROUTE 0123456789abcdef\n";
        assert_eq!(
            read(&mut long, 16).await,
            Err(PreambleError::TooLong { max: 16 })
        );
        let mut cut: &[u8] = b"ROUTE ro";
        assert_eq!(read(&mut cut, 64).await, Err(PreambleError::Closed));
    }
}
