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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use crate::config::tests::{assert_problems, problems};
    use crate::config::{Config, RegistryBackend};

    struct Files {
        _dir: tempfile::TempDir,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        other_key: PathBuf,
        open_key: PathBuf,
    }

    /// A CA, a certificate it signed with its key (0600), another key
    /// (0600), and the key again readable by all (0644).
    fn files() -> Files {
        let dir = tempfile::tempdir().expect("dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["squire.test".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("cert");
        let other = rcgen::KeyPair::generate().expect("key");
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            path
        };
        Files {
            ca: write("ca.pem", &ca.pem(), 0o644),
            cert: write("cert.pem", &cert.pem(), 0o644),
            key: write("key.pem", &key.serialize_pem(), 0o600),
            other_key: write("other.key", &other.serialize_pem(), 0o600),
            open_key: write("open.key", &key.serialize_pem(), 0o644),
            _dir: dir,
        }
    }

    fn upstream(extra: &str) -> String {
        format!("[[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:0\"\n{extra}")
    }

    #[test]
    fn listener_and_dial_tls_are_read_and_keys_never_print() {
        let f = files();
        let text = upstream(&format!(
            "[upstream.listen_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\
             [upstream.tls]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\nserver_name_metadata = \"tls_name\"\n",
            f.cert.display(),
            f.key.display(),
            f.ca.display(),
            f.ca.display(),
            f.cert.display(),
            f.key.display(),
        ));
        let config = Config::from_toml(&text).expect("valid");
        let upstream = &config.upstreams[0];
        let listen = upstream.listen_tls.as_ref().expect("listen_tls");
        assert_eq!(listen.handshake_timeout, std::time::Duration::from_secs(10));
        assert!(listen.client_ca.is_some());
        let dial = upstream.tls.as_ref().expect("tls");
        assert_eq!(dial.server_name_metadata.as_deref(), Some("tls_name"));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("PRIVATE KEY") && shown.contains("key.pem"),
            "{shown}"
        );
        // The same files read again: the same configuration.
        assert_eq!(
            Config::from_toml(&text).expect("valid").upstreams,
            config.upstreams
        );
    }

    #[test]
    fn bad_files_are_problems_at_their_keys() {
        let f = files();
        let found = problems(&upstream(&format!(
            "[upstream.listen_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"/nonexistent/ca.pem\"\n\
             [upstream.tls]\nclient_cert = \"{}\"\nserver_name = \"not a name\"\n",
            f.cert.display(),
            f.other_key.display(),
            f.cert.display(),
        )));
        assert_problems(
            &found,
            &[
                "upstream.gate.listen_tls.key: cannot use private key file",
                "upstream.gate.listen_tls.client_ca: cannot read certificate file /nonexistent/ca.pem",
                "upstream.gate.tls.client_key: required when client_cert is set",
                "upstream.gate.tls.server_name: \"not a name\" is not a DNS name",
            ],
        );
        let found = problems(&upstream(&format!(
            "[upstream.listen_tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            f.ca.display(),
            f.open_key.display(),
        )));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("upstream.gate.listen_tls.key: ")
                && found[0].contains("chmod 600"),
            "{found:#?}"
        );
        let found = problems(&upstream("[upstream.listen_tls]\nclient_ca = \"x\"\n"));
        assert!(found
            .iter()
            .any(|p| p.starts_with("upstream.gate.listen_tls.cert: required")));
    }

    #[test]
    fn tls_is_for_tcp_listeners() {
        let f = files();
        let found = problems(&upstream(&format!(
            "protocol = \"http\"\n[upstream.tls]\nca = \"{}\"\n",
            f.ca.display()
        )));
        assert_eq!(
            found,
            ["upstream.gate.tls: only applies to protocol = \"tcp\" (TLS is not supported on http listeners yet)"]
        );
    }

    #[test]
    fn etcd_takes_https_with_a_ca_and_a_client_certificate() {
        let f = files();
        let text = format!(
            "[registry]\nkind = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\", \"127.0.0.1:2380\"]\n\
             ca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            f.ca.display(),
            f.cert.display(),
            f.key.display()
        );
        let config = Config::from_toml(&text).expect("valid");
        let RegistryBackend::Etcd(etcd) = &config.registries[0].backend else {
            panic!("etcd expected");
        };
        let tls = etcd.tls.as_ref().expect("tls");
        assert!(tls.ca.is_some() && tls.identity.is_some());

        let found = problems(&format!(
            "[registry]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\nca = \"{}\"\n",
            f.ca.display()
        ));
        assert_problems(
            &found,
            &["registry.endpoints[0]: is http:// while TLS is configured"],
        );
        let found = problems(&format!(
            "[registry]\nca = \"{}\"\nclient_key = \"{}\"\n",
            f.ca.display(),
            f.key.display()
        ));
        assert_problems(
            &found,
            &[
                "registry.ca: only applies to kind = \"etcd\" or \"consul\"",
                "registry.client_key: only applies to kind = \"etcd\" or \"consul\"",
            ],
        );
    }

    #[test]
    fn consul_client_certificate_needs_https() {
        let f = files();
        let found = problems(&format!(
            "[registry]\nkind = \"consul\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            f.cert.display(),
            f.key.display()
        ));
        assert_eq!(
            found,
            ["registry.client_cert: only applies to an https:// address"]
        );
    }
}
