//! The TLS keys: a CA, a client certificate and key (`[registry]` of kind
//! etcd or consul, `[upstream.tls]`), and a listener's certificate
//! (`[upstream.listen_tls]`).
//!
//! Every file is read and parsed here, at load: an unreadable file, one
//! without a PEM certificate or key, a key others can read, or a key that
//! does not go with its certificate is a problem at the key that names it.
//! What is read is kept (see [`PemFile`]), so a reload that finds other
//! bytes in a file rebuilds what uses it.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::ServerName;

use super::problems::{duration, Problems};
use super::raw::{RawDialTls, RawListenTls};
use crate::tls::{dial_config, server_config, Identity, PemFile, Prepared};

/// `[upstream.tls]`: the instances are dialed over TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct DialTls {
    /// The CA that signs the instances' certificates; `None`: the public
    /// roots.
    pub ca: Option<PemFile>,
    /// Presented when the instance asks (mutual TLS).
    pub identity: Option<Identity>,
    /// The name the instances' certificates are checked against, unless
    /// [`DialTls::server_name_metadata`] gives one; `None`: the host each
    /// instance registered.
    pub server_name: Option<String>,
    /// An instance metadata key whose value, where an instance has it, is
    /// that instance's server name.
    pub server_name_metadata: Option<String>,
    /// Built from the files above.
    pub client: Prepared<rustls::ClientConfig>,
}

/// `[upstream.listen_tls]`: the listener terminates TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenTls {
    pub identity: Identity,
    /// With it, clients must present a certificate it signed.
    pub client_ca: Option<PemFile>,
    /// Bound on a client's TLS handshake.
    pub handshake_timeout: Duration,
    /// Built from the files above.
    pub server: Prepared<rustls::ServerConfig>,
}

/// Reads the certificates at `value`, reporting problems at `path`.
pub(super) fn certificates(
    path: &str,
    value: Option<String>,
    problems: &mut Problems,
) -> Option<PemFile> {
    let file = value?;
    if file.is_empty() {
        problems.push(path, "must not be empty");
        return None;
    }
    PemFile::certificates(Path::new(&file))
        .map_err(|e| problems.push(path, e.to_string()))
        .ok()
}

/// A certificate and its key, from the keys `cert_key` and `key_key` under
/// `base`; both or neither.
pub(super) fn identity(
    base: &str,
    (cert_key, cert): (&str, Option<String>),
    (key_key, key): (&str, Option<String>),
    problems: &mut Problems,
) -> Option<Identity> {
    let at = |key: &str| format!("{base}.{key}");
    match (&cert, &key) {
        (Some(_), None) => {
            problems.push(at(key_key), format!("required when {cert_key} is set"));
            return None;
        }
        (None, Some(_)) => {
            problems.push(at(cert_key), format!("required when {key_key} is set"));
            return None;
        }
        _ => {}
    }
    let cert = certificates(&at(cert_key), cert, problems);
    let key = key.and_then(|file| {
        if file.is_empty() {
            problems.push(at(key_key), "must not be empty");
            return None;
        }
        PemFile::private_key(Path::new(&file))
            .map_err(|e| problems.push(at(key_key), e.to_string()))
            .ok()
    });
    let identity = Identity {
        cert: cert?,
        key: key?,
    };
    match identity.check() {
        Ok(()) => Some(identity),
        Err(e) => {
            problems.push(at(key_key), e.to_string());
            None
        }
    }
}

pub(super) fn validate_dial(
    base: &str,
    raw: RawDialTls,
    problems: &mut Problems,
) -> Option<DialTls> {
    let base = format!("{base}.tls");
    let at = |key: &str| format!("{base}.{key}");
    let ca = certificates(&at("ca"), raw.ca, problems);
    let raw_identity_set = raw.client_cert.is_some() || raw.client_key.is_some();
    let identity = identity(
        &base,
        ("client_cert", raw.client_cert),
        ("client_key", raw.client_key),
        problems,
    );
    let server_name = raw.server_name.filter(|name| {
        let valid = ServerName::try_from(name.as_str()).is_ok();
        if !valid {
            problems.push(
                at("server_name"),
                format!("{name:?} is not a DNS name or an IP address"),
            );
        }
        valid
    });
    let server_name_metadata = raw.server_name_metadata.filter(|key| {
        if key.is_empty() {
            problems.push(at("server_name_metadata"), "must not be empty");
        }
        !key.is_empty()
    });
    let set = (raw_identity_set, identity.is_some());
    if set.0 && !set.1 {
        return None; // reported above
    }
    let client = dial_config(ca.as_ref(), identity.as_ref())
        .map_err(|e| problems.push(&base, e.to_string()))
        .ok()?;
    Some(DialTls {
        ca,
        identity,
        server_name,
        server_name_metadata,
        client: Prepared(client),
    })
}

pub(super) fn validate_listen(
    base: &str,
    raw: RawListenTls,
    problems: &mut Problems,
) -> Option<ListenTls> {
    let base = format!("{base}.listen_tls");
    let at = |key: &str| format!("{base}.{key}");
    if raw.cert.is_none() && raw.key.is_none() {
        problems.push(at("cert"), "required (with key) in [upstream.listen_tls]");
    }
    let identity = identity(&base, ("cert", raw.cert), ("key", raw.key), problems);
    let client_ca = certificates(&at("client_ca"), raw.client_ca, problems);
    let handshake_timeout = duration(
        &at("handshake_timeout"),
        raw.handshake_timeout,
        "10s",
        problems,
    );
    if handshake_timeout.is_zero() {
        problems.push(at("handshake_timeout"), "must be greater than zero");
    }
    let identity = identity?;
    let server = server_config(&identity, client_ca.as_ref())
        .map_err(|e| problems.push(&base, e.to_string()))
        .ok()?;
    Some(ListenTls {
        identity,
        client_ca,
        handshake_timeout,
        server: Prepared(server),
    })
}
