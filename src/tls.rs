//! TLS settings, built from configuration and shared: clients (health
//! probes, Consul, etcd, upstreams dialing their instances over TLS) and
//! servers (listeners that terminate TLS).
//!
//! Server certificates are verified against the Mozilla roots
//! (webpki-roots, so no system package is needed) plus an optional CA file,
//! or, for upstreams and listeners given a CA, against that CA alone;
//! skipping verification happens only when a configuration says so
//! explicitly. Everything uses rustls with the ring provider, passed
//! explicitly, so no process-wide default provider is needed.
//!
//! Certificate and key files are read into a [`PemFile`] when the
//! configuration is loaded: a file that cannot be read or parsed is a
//! configuration problem, and a reload that finds other bytes in a file
//! sees a changed configuration and rebuilds what uses it.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The largest certificate or key file read: a chain, not a bundle of a
/// whole PKI.
const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("CA file {} holds no certificate", path.display())]
    EmptyCaFile { path: PathBuf },
    #[error("cannot read certificate file {}: {reason}", path.display())]
    CertFile { path: PathBuf, reason: String },
    /// The reason never quotes the file: it is a private key.
    #[error("cannot use private key file {}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// A PEM file read at configuration load: its path, shown, and its bytes,
/// compared (so a rotated certificate is a changed configuration) but
/// never shown: `Debug` prints the path only, as the file may be a key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pem: Arc<[u8]>,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PemFile({})", self.path.display())
    }
}

impl PemFile {
    /// Reads a file of certificates (a chain, or CAs); at least one.
    pub fn certificates(path: &Path) -> Result<PemFile, TlsError> {
        let bad = |reason: String| TlsError::CertFile {
            path: path.to_owned(),
            reason,
        };
        let pem = read_pem(path, false).map_err(bad)?;
        let file = PemFile {
            path: path.to_owned(),
            pem: pem.into(),
        };
        file.certs()?;
        Ok(file)
    }

    /// Reads a private key (PKCS#8, PKCS#1 or SEC1 PEM) from a file only
    /// squire's user can read (as for secret files; see
    /// [`crate::config::check_private`]).
    pub fn private_key(path: &Path) -> Result<PemFile, TlsError> {
        let pem = read_pem(path, true).map_err(|reason| TlsError::KeyFile {
            path: path.to_owned(),
            reason,
        })?;
        let file = PemFile {
            path: path.to_owned(),
            pem: pem.into(),
        };
        file.key()?;
        Ok(file)
    }

    /// The PEM text, for APIs that parse it themselves (tonic).
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::CertFile {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::CertFile {
                path: self.path.clone(),
                reason: "no PEM certificate in it".into(),
            });
        }
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.pem).map_err(|e| TlsError::KeyFile {
            path: self.path.clone(),
            // The parser's message names the PEM section, never its bytes.
            reason: format!("no PEM private key in it ({e})"),
        })
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certs()? {
            roots.add(cert).map_err(|e| TlsError::CaFile {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(roots)
    }
}

/// Reads a whole PEM file, bounded; `private`: refuse a file others can
/// read. Errors name the path, never the content.
fn read_pem(path: &Path, private: bool) -> Result<Vec<u8>, String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO in place of the file must not hang configuration load.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if private {
        crate::config::check_private(path, &meta)?;
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(format!("larger than {MAX_PEM_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

/// A rustls configuration built from files at configuration load, carried
/// in the configuration next to the [`PemFile`]s it was built from. Those
/// say whether two configurations are the same, so this compares equal to
/// any other and prints nothing of itself.
#[derive(Clone)]
pub struct Prepared<T>(pub Arc<T>);

impl<T> PartialEq for Prepared<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> fmt::Debug for Prepared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Prepared")
    }
}

/// A certificate chain and its private key: a client certificate, or a
/// listener's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert: PemFile,
    pub key: PemFile,
}

impl Identity {
    /// Whether the key belongs to the certificate; `Err` says why not.
    pub fn check(&self) -> Result<(), TlsError> {
        server_config(self, None).map(|_| ())
    }

    fn parts(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        Ok((self.cert.certs()?, self.key.key()?))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts the public roots and `ca`, or trusts
/// anything when `skip_verify` is set, presenting `identity` if the server
/// asks for a client certificate.
pub fn client_config(
    ca: Option<&Path>,
    skip_verify: bool,
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = if skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca {
            for cert in load_ca(path)? {
                roots.add(cert).map_err(|e| TlsError::CaFile {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let (chain, key) = identity.parts()?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| key_mismatch(identity, e))?
        }
    };
    Ok(Arc::new(config))
}

/// A client configuration for dialing instances: it trusts `ca` alone when
/// given (a private CA of the fleet), else the public roots, and presents
/// `identity` when the server asks.
pub fn dial_config(
    ca: Option<&PemFile>,
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => ca.roots()?,
        None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let (chain, key) = identity.parts()?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| key_mismatch(identity, e))?
        }
    };
    Ok(Arc::new(config))
}

/// A server configuration presenting `identity`; with `client_ca`, every
/// client must present a certificate that CA signed (mutual TLS).
pub fn server_config(
    identity: &Identity,
    client_ca: Option<&PemFile>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()?), provider)
                    .build()
                    .map_err(|e| TlsError::CaFile {
                        path: ca.path.clone(),
                        reason: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let (chain, key) = identity.parts()?;
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| key_mismatch(identity, e))?;
    Ok(Arc::new(config))
}

fn key_mismatch(identity: &Identity, error: rustls::Error) -> TlsError {
    TlsError::KeyFile {
        path: identity.key.path.clone(),
        reason: format!(
            "does not go with certificate {}: {error}",
            identity.cert.path.display()
        ),
    }
}

/// Reads a PEM file of CA certificates; at least one must be there.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::CaFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCaFile {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Accepts any certificate: only for `tls_skip_verify = true`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
