//! Header rewriting between client and instance: hop-by-hop headers
//! stripped both ways, `X-Forwarded-For`/`-Proto` added, the upgrade pair
//! kept when the client asks to switch protocols.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Uri, Version};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client named in
/// `Connection` apply to one connection only.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
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

/// Turns the client's request headers into the instance's: hop-by-hop
/// headers out (the upgrade pair back in when asked for), `Host` from an
/// HTTP/2 authority, the client appended to `X-Forwarded-For`.
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    version: Version,
    uri: &Uri,
    client: SocketAddr,
) {
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
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let chain: Vec<String> = headers
        .get_all(&forwarded_for)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let ip = client.ip().to_string();
    let value = if chain.is_empty() {
        ip
    } else {
        format!("{}, {ip}", chain.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(forwarded_for, value);
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&proto) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
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
        prepare_request_headers(
            &mut headers,
            Version::HTTP_11,
            &uri,
            "127.0.0.1:5000".parse().expect("addr"),
        );
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.7, 10.0.0.1, 127.0.0.1"
        );
        assert_eq!(headers["x-forwarded-proto"], "http");
    }
}
