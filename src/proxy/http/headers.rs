//! Header rewriting between client and instance: hop-by-hop headers
//! stripped both ways, `X-Forwarded-For`/`-Proto` added, the upgrade pair
//! kept when the client asks to switch protocols.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Uri, Version};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client named in
/// `Connection` apply to one connection only.
///
/// One pass over the names finds them; most messages carry none, and then
/// nothing is hashed or removed (removing the nine names one by one was 8%
/// of squire's instructions per proxied request).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in Connection only matter when Connection is there,
    // which is itself hop-by-hop: only then is this reached.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in named.into_iter().chain(present) {
        headers.remove(name);
    }
}

/// By the name's text: comparing with nine `HeaderName`s built and
/// dropped on every call cost ~45 instructions per header.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Whether the request asks to switch protocols (`Connection: upgrade`
/// with an `Upgrade` header).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Fields squire adds to a request, sent after the client's own. They stay
/// out of the client's `HeaderMap`: hyper sized it for the fields it
/// parsed, and inserting two more rehashed it on most requests (~1,000
/// instructions each).
#[derive(Debug, Default)]
pub struct Added {
    /// `X-Forwarded-For` when the client sent none (a chain it sent is
    /// extended in place).
    forwarded_for: Option<HeaderValue>,
    /// `X-Forwarded-Proto` when the client sent none.
    forwarded_proto: Option<HeaderValue>,
}

impl Added {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        let forwarded_for = self.forwarded_for.iter().map(|v| ("x-forwarded-for", v));
        let proto = self
            .forwarded_proto
            .iter()
            .map(|v| ("x-forwarded-proto", v));
        forwarded_for.chain(proto)
    }

    /// The added value of `name`, if squire adds it.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.iter()
            .find(|(added, _)| added.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// Into a map (a request hyper sends: HTTP/2, upgrades).
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        if let Some(value) = &self.forwarded_for {
            headers.insert(X_FORWARDED_FOR, value.clone());
        }
        if let Some(value) = &self.forwarded_proto {
            headers.insert(X_FORWARDED_PROTO, value.clone());
        }
    }
}

/// Turns the client's request headers into the instance's: hop-by-hop
/// headers out (the upgrade pair back in when asked for), `Host` from an
/// HTTP/2 authority, the client appended to `X-Forwarded-For`. Returns the
/// fields to add after them.
#[must_use]
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    version: Version,
    uri: &Uri,
    client: &Client,
) -> Added {
    let upgrade = headers
        .get(header::UPGRADE)
        .cloned()
        .filter(|_| is_upgrade(headers));
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
        // The Connection/Upgrade pair is what asks the instance to switch.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // HTTP/2 carries the host in the URI; the instance sees it as Host.
    if version == Version::HTTP_2 && !headers.contains_key(header::HOST) {
        if let Some(host) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, host);
        }
    }
    Added {
        forwarded_for: (!append_forwarded_for(headers, &client.forwarded_for))
            .then(|| client.forwarded_for.clone()),
        forwarded_proto: (!headers.contains_key(X_FORWARDED_PROTO))
            .then(|| HeaderValue::from_static("http")),
    }
}

/// The client of one connection: its address, and its IP as
/// `X-Forwarded-For` carries it, rendered once per connection instead of
/// on every request (formatting the IP was ~1,300 of the ~34,000
/// instructions of a proxied keep-alive request).
pub struct Client {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            // An IP address in text is visible ASCII, always a valid value.
            forwarded_for: HeaderValue::try_from(addr.ip().to_string())
                .expect("an IP address is a valid header value"),
        }
    }
}

/// Appends `ip` to the client's `X-Forwarded-For` chain (one header, the
/// earlier values joined with ", "); false when there is no chain.
fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) -> bool {
    let mut earlier = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    if earlier.peek().is_none() {
        return false;
    }
    let mut value = String::new();
    for earlier in earlier {
        value.push_str(earlier);
        value.push_str(", ");
    }
    value.push_str(ip.to_str().unwrap_or_default());
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-session-hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-session-hop", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-game", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-game"], "kept");
    }

    #[test]
    fn forwarded_for_extends_the_client_chain() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.7, 10.0.0.1"),
        );
        let uri: Uri = "/".parse().expect("uri");
        let added = prepare_request_headers(
            &mut headers,
            Version::HTTP_11,
            &uri,
            &Client::new("127.0.0.1:5000".parse().expect("addr")),
        );
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.7, 10.0.0.1, 127.0.0.1"
        );
        let added: Vec<_> = added.iter().collect();
        assert_eq!(
            added,
            [("x-forwarded-proto", &HeaderValue::from_static("http"))]
        );
    }

    #[test]
    fn forwarded_for_starts_the_chain_with_the_client() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/".parse().expect("uri");
        let client = Client::new("[2001:db8::7]:5000".parse().expect("addr"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let added = prepare_request_headers(&mut headers, Version::HTTP_11, &uri, &client);
        assert_eq!(added.get("X-Forwarded-For").expect("added"), "2001:db8::7");
        assert_eq!(
            added.get("x-forwarded-proto"),
            None,
            "the client's own is kept"
        );
        let mut map = HeaderMap::new();
        added.insert_into(&mut map);
        assert_eq!(map.len(), 1);
        assert_eq!(map["x-forwarded-for"], "2001:db8::7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(client.addr.port(), 5000);
    }
}
