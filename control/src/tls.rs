//! HTTPS where the API leaves the machine (rustls with the ring provider). A REST API or a
//! tracker bound beyond loopback serves TLS with the configured certificate, or with a
//! self-signed pair kept in the data directory ([`CERT_FILE`], [`KEY_FILE`] mode 0600), made
//! at `neuroshard setup` or at the first start that needs it. Plain HTTP beyond loopback only
//! with `tls.insecure_http` (`--insecure-http`), and a warning at every start.
//!
//! Clients of the node's own: the CLI pins the certificate the running daemon serves (it
//! writes a copy to [`SERVED_FILE`]); a node verifies an https tracker with the system roots
//! or pins the certificate named by `tracker_fingerprint` ([`Pinned`]). A pin compares the
//! SHA-256 of the whole certificate (as `openssl x509 -fingerprint -sha256` prints it) and
//! still checks the handshake's signature with the certificate's key; it skips the name check,
//! which is what lets the CLI reach a node on 127.0.0.1 whatever names its certificate holds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
pub use crate::config::parse_fingerprint;

/// The self-signed certificate in the data directory.
pub const CERT_FILE: &str = "tls.crt";
/// Its private key (mode 0600).
pub const KEY_FILE: &str = "tls.key";
/// A copy of the certificate the running daemon serves, for the CLI to pin; removed at a start
/// that serves plain HTTP.
pub const SERVED_FILE: &str = "api.tls.crt";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("{path} holds no PEM private key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the certificate and key do not make a TLS server: {0}")]
    Server(rustls::Error),
    #[error("making a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Whether a server bound to `host` serves HTTPS: beyond loopback, unless told otherwise.
pub fn serves_tls(host: IpAddr, insecure_http: bool) -> bool {
    !host.is_loopback() && !insecure_http
}

/// Where a certificate and its key are.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pair {
    /// The configured pair, or the data directory's self-signed one.
    pub fn for_config(data_dir: &Path, tls: &TlsConfig) -> Pair {
        if tls.cert.is_empty() {
            Pair::self_signed(data_dir)
        } else {
            Pair {
                cert: tls.cert.clone().into(),
                key: tls.key.clone().into(),
            }
        }
    }

    /// The self-signed pair of `data_dir`.
    pub fn self_signed(data_dir: &Path) -> Pair {
        Pair {
            cert: data_dir.join(CERT_FILE),
            key: data_dir.join(KEY_FILE),
        }
    }
}

/// Makes the self-signed pair of `data_dir` unless both files exist (returns whether it made
/// one). Its names: localhost, 127.0.0.1, ::1, this machine's host name and `host` (the
/// configured bind address, unless it is 0.0.0.0 or ::).
pub fn ensure_self_signed(data_dir: &Path, host: &str) -> Result<bool, TlsError> {
    let pair = Pair::self_signed(data_dir);
    if pair.cert.exists() && pair.key.exists() {
        return Ok(false);
    }
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_string());
    }
    if !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        names.push(host.to_string());
    }
    names.retain(|n| !n.is_empty());
    names.dedup();
    let made = rcgen::generate_simple_self_signed(names)?;
    // The key first: a certificate without its key would be taken as a pair next time.
    crate::config::write_atomic_mode(
        &pair.key,
        made.signing_key.serialize_pem().as_bytes(),
        0o600,
    )
    .map_err(|source| TlsError::Write {
        path: pair.key.clone(),
        source,
    })?;
    crate::config::write_atomic_mode(&pair.cert, made.cert.pem().as_bytes(), 0o644).map_err(
        |source| TlsError::Write {
            path: pair.cert.clone(),
            source,
        },
    )?;
    Ok(true)
}

/// A certificate chain (leaf first) with its key.
pub struct Certified {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Certified {
    /// The leaf certificate's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }
}

/// The certificates of the PEM file at `path` (at least one).
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let bad = |message: String| TlsError::Certificate {
        path: path.into(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(chain)
}

/// Reads the pair at `pair`.
pub fn load(pair: &Pair) -> Result<Certified, TlsError> {
    let chain = read_chain(&pair.cert)?;
    let bytes = std::fs::read(&pair.key).map_err(|source| TlsError::Read {
        path: pair.key.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Key {
        path: pair.key.clone(),
        message: e.to_string(),
    })?;
    Ok(Certified { chain, key })
}

/// ring: it builds with a C compiler alone (aws-lc-rs, the provider rustls now prefers for its
/// post-quantum key exchange, needs cmake); classical X25519/P-256 key exchange.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS side of a server serving `certified` (ALPN h2 and http/1.1).
pub fn acceptor(certified: &Certified) -> Result<TlsAcceptor, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Server)?
        .with_no_client_auth()
        .with_single_cert(certified.chain.clone(), certified.key.clone_key())
        .map_err(TlsError::Server)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The SHA-256 of a certificate.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The SHA-256 of a certificate, as `AB:CD:...` (openssl's `-fingerprint -sha256` form).
pub fn fingerprint(der: &[u8]) -> String {
    fingerprint_hex(&sha256(der))
}

/// Accepts exactly one server certificate, by its SHA-256; the handshake's signature is still
/// checked with that certificate's key.
#[derive(Debug)]
pub struct Pinned {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256 {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "the server's certificate {} is not the pinned one {}",
            fingerprint(end_entity),
            fingerprint_hex(&self.sha256)
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A SHA-256 as `AB:CD:...`.
pub fn fingerprint_hex(sha256: &[u8; 32]) -> String {
    sha256
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A client configuration that trusts only the certificate whose SHA-256 is `sha256`.
pub fn pinned_client(sha256: [u8; 32]) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        sha256,
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Server)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// What the daemon's REST API serves: `Some(acceptor)` for HTTPS. Beyond loopback it loads the
/// configured pair or the data directory's (made if missing) and writes [`SERVED_FILE`]; plain
/// HTTP removes that file, and beyond loopback (`tls.insecure_http`) logs a warning.
pub fn for_node(
    data_dir: &Path,
    host: IpAddr,
    host_text: &str,
    tls: &TlsConfig,
) -> Result<Option<TlsAcceptor>, TlsError> {
    let served = data_dir.join(SERVED_FILE);
    if !serves_tls(host, tls.insecure_http) {
        if !host.is_loopback() {
            tracing::warn!(
                host = host_text,
                "serving plain HTTP beyond loopback (tls.insecure_http): bearer tokens cross \
                 the network in clear"
            );
        }
        match std::fs::remove_file(&served) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TlsError::Write {
                    path: served,
                    source,
                });
            }
        }
        return Ok(None);
    }
    let pair = Pair::for_config(data_dir, tls);
    if tls.cert.is_empty() && ensure_self_signed(data_dir, host_text)? {
        tracing::info!(cert = %pair.cert.display(), "made a self-signed TLS certificate");
    }
    let certified = load(&pair)?;
    let acceptor = acceptor(&certified)?;
    let pem = std::fs::read(&pair.cert).map_err(|source| TlsError::Read {
        path: pair.cert.clone(),
        source,
    })?;
    crate::config::write_atomic(&served, &pem).map_err(|source| TlsError::Write {
        path: served.clone(),
        source,
    })?;
    tracing::info!(
        cert = %pair.cert.display(),
        sha256 = %certified.fingerprint(),
        "the REST API serves HTTPS"
    );
    Ok(Some(acceptor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_is_made_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_self_signed(dir.path(), "192.0.2.7").unwrap());
        let pair = Pair::self_signed(dir.path());
        let mode = std::fs::metadata(&pair.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = load(&pair).unwrap().fingerprint();
        assert!(!ensure_self_signed(dir.path(), "192.0.2.7").unwrap());
        assert_eq!(load(&pair).unwrap().fingerprint(), first);
        assert_eq!(
            parse_fingerprint(&first).map(|f| fingerprint_hex(&f)),
            Some(first.clone())
        );
        assert!(acceptor(&load(&pair).unwrap()).is_ok());
        let pem = std::fs::read_to_string(&pair.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let pair = Pair::self_signed(dir.path());
        assert!(matches!(load(&pair), Err(TlsError::Read { .. })));
        std::fs::write(&pair.cert, "not pem").unwrap();
        std::fs::write(&pair.key, "not pem").unwrap();
        let err = load(&pair).err().unwrap();
        assert!(matches!(err, TlsError::Certificate { .. }), "{err}");
        assert!(err.to_string().contains(CERT_FILE), "{err}");
        // A pair that is there, even a bad one, is never overwritten.
        assert!(!ensure_self_signed(dir.path(), "::").unwrap());
    }

    #[test]
    fn only_loopback_hosts_serve_plain_http_by_default() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(!serves_tls(ip("127.0.0.1"), false));
        assert!(!serves_tls(ip("127.3.0.1"), false));
        assert!(!serves_tls(ip("::1"), false));
        assert!(serves_tls(ip("0.0.0.0"), false));
        assert!(serves_tls(ip("::"), false));
        assert!(serves_tls(ip("192.0.2.7"), false));
        assert!(!serves_tls(ip("192.0.2.7"), true));
    }

    #[tokio::test]
    async fn a_pinned_client_accepts_its_certificate_and_refuses_another() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        ensure_self_signed(dir.path(), "127.0.0.1").unwrap();
        let certified = load(&Pair::self_signed(dir.path())).unwrap();
        let server = acceptor(&certified).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = server.accept(s).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        let connect = |pin: [u8; 32]| async move {
            let connector = tokio_rustls::TlsConnector::from(Arc::new(pinned_client(pin).unwrap()));
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        };
        let pin = parse_fingerprint(&certified.fingerprint()).unwrap();
        assert_eq!(connect(pin).await.unwrap(), b"hello");
        let err = connect([7; 32]).await.expect_err("another pin is refused");
        assert!(err.to_string().contains("not the pinned one"), "{err}");
    }
}
