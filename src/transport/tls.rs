//! Certificates: the head's CA, issued certificates, join tokens pinning the CA, peer
//! identities, and the rustls configurations built from them.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

/// ALPN protocol of edgesync's QUIC connections.
pub const ALPN: &[u8] = b"edgesync/1";
/// The same protocol, where the dialer's Hello also says its edgesync version. Both are
/// offered; one that knows only [`ALPN`] negotiates that, and gets the Hello it knows.
pub const ALPN_HELLO_VERSION: &[u8] = b"edgesync/1.1";
/// The protocol of [`ALPN_HELLO_VERSION`], where sync messages may also go in the compact
/// encoding ([`crate::sync::compact`]).
pub const ALPN_COMPACT: &[u8] = b"edgesync/1.2";
/// The protocol of [`ALPN_COMPACT`], spoken by builds that read a document's generation with
/// its counts per writer ([`crate::model::count_per_writer`]): a head moves an EdgeNode's
/// document to them only once its edge speaks this.
pub const ALPN_COUNTS: &[u8] = b"edgesync/1.3";

/// The protocols offered and accepted, the preferred first.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![
        ALPN_COUNTS.to_vec(),
        ALPN_COMPACT.to_vec(),
        ALPN_HELLO_VERSION.to_vec(),
        ALPN.to_vec(),
    ]
}
/// Server name every head certificate carries and every client asks for.
pub const HEAD_SERVER_NAME: &str = "edgesync-head";
/// Default lifetime of a certificate issued to a node (renewed after two thirds of it).
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const TOKEN_PREFIX: &str = "edgesync1";

/// Errors about certificates and tokens.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// Client verifier could not be built.
    #[error("tls client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A join token is malformed.
    #[error(
        "join token is malformed: expected {TOKEN_PREFIX}.<ca sha256>.<id>.<secret> as printed by `edgesync token create`"
    )]
    BadToken,
    /// A certificate does not carry an edgesync identity.
    #[error("certificate has no edgesync identity (CN and OU)")]
    NoIdentity,
}

/// Role of a peer, carried as the certificate's OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A head node: may sync every document.
    Head,
    /// An edge node: may sync only documents named after it.
    Edge,
}

impl Role {
    /// `head` or `edge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Head => "head",
            Role::Edge => "edge",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of a connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Head or edge.
    pub role: Role,
    /// Node name (CN).
    pub name: String,
    /// SHA-256 of the certificate's public key (SubjectPublicKeyInfo), which the head records
    /// for each edge: only the latest key issued to a name is let in.
    pub key: Vec<u8>,
}

impl Identity {
    /// Whether this peer may read and write document `key` (`namespace/name`).
    pub fn may_access(&self, key: &str) -> bool {
        match self.role {
            Role::Head => true,
            Role::Edge => crate::key::edge_of(key) == Some(self.name.as_str()),
        }
    }
}

/// A certificate chain and its private key, ready for rustls.
#[derive(Debug)]
pub struct KeyedCert {
    /// Leaf first, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for KeyedCert {
    fn clone(&self) -> Self {
        KeyedCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The head's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    key_pem: String,
}

impl Ca {
    /// Loads `ca.crt`/`ca.key` from `dir`, or creates them (key mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, TlsError> {
        if let Some(ca) = Ca::load(dir)? {
            return Ok(ca);
        }
        let ca = Ca::generate()?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// The CA kept in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Ca>, TlsError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if !(cert_path.exists() || key_path.exists()) {
            return Ok(None);
        }
        Ca::from_pem(&read(&cert_path)?, &read(&key_path)?).map(Some)
    }

    /// A new CA, in memory.
    pub fn generate() -> Result<Ca, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("edgesync CA", None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Ca {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert: pem_to_der(cert_pem)?,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        crate::fsutil::write_private(&key_path, self.key_pem.as_bytes())
            .map_err(|source| io_err(&key_path, source))?;
        crate::fsutil::write_atomic(&cert_path, self.cert_pem.as_bytes(), 0o644)
            .map_err(|source| io_err(&cert_path, source))
    }

    /// The CA's private key, PEM (for the cluster Secret that heads share).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A 32-byte key for `purpose`, the same on every head that shares this CA (and secret as
    /// long as its private key is): HMAC-SHA256 of the purpose, keyed by the key.
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(self.key_pem.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// SHA-256 of the CA certificate, hex: what join tokens pin.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(&self.cert))
    }

    /// A fresh certificate for this head (server and client use), key kept in memory only.
    pub fn issue_head(&self, name: &str) -> Result<KeyedCert, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![HEAD_SERVER_NAME.to_string()])?;
        params.distinguished_name = dn(name, Some(Role::Head));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, NODE_CERT_LIFETIME);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(KeyedCert {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// A server certificate for the head's HTTPS API, for `names` (host names or IP addresses).
    pub fn issue_api(&self, names: &[String]) -> Result<KeyedCert, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("edgesync head API", None);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, NODE_CERT_LIFETIME);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(KeyedCert {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Signs an edge's certificate request as `name`, valid for `lifetime`; subject and
    /// extensions in the request are ignored. Returns the certificate PEM.
    pub fn sign_edge(
        &self,
        csr_der: &[u8],
        name: &str,
        lifetime: Duration,
    ) -> Result<String, TlsError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der)?;
        csr.params = CertificateParams::default();
        csr.params.distinguished_name = dn(name, Some(Role::Edge));
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut csr.params, lifetime);
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// A new key pair and a certificate request for it (DER), made on the edge.
pub fn new_request(name: &str) -> Result<(KeyPair, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name, Some(Role::Edge));
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// SHA-256 of the public key certificate request `csr_der` asks a certificate for (as
/// [`identity`] hashes a certificate's), once its signature shows the requester holds the key
/// (so a forged request learns nothing of which keys are registered).
pub fn request_key(csr_der: &[u8]) -> Result<Vec<u8>, TlsError> {
    use x509_parser::prelude::FromDer;
    let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
    CertificateSigningRequestParams::from_der(&der)?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|_| rcgen::Error::CouldNotParseCertificationRequest)?;
    Ok(Sha256::digest(csr.certification_request_info.subject_pki.raw).to_vec())
}

/// A join token: the CA hash to pin, a token id, and the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the head's CA certificate, hex.
    pub ca_hash: String,
    /// Public token id.
    pub id: String,
    /// Secret part (the head stores only its hash).
    pub secret: String,
}

impl JoinToken {
    /// A new random token for a CA.
    pub fn generate(ca_hash: &str) -> JoinToken {
        JoinToken {
            ca_hash: ca_hash.to_string(),
            id: hex::encode(random_bytes::<4>()),
            secret: hex::encode(random_bytes::<16>()),
        }
    }

    /// SHA-256 of the secret, as stored by the head.
    pub fn secret_hash(&self) -> Vec<u8> {
        Sha256::digest(self.secret.as_bytes()).to_vec()
    }

    /// Parses `edgesync1.<ca sha256>.<id>.<secret>`.
    pub fn parse(text: &str) -> Result<JoinToken, TlsError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let hexish =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        match parts.as_slice() {
            [TOKEN_PREFIX, ca, id, secret]
                if hexish(ca, 64) && hexish(id, 8) && hexish(secret, 32) =>
            {
                Ok(JoinToken {
                    ca_hash: ca.to_ascii_lowercase(),
                    id: id.to_ascii_lowercase(),
                    secret: secret.to_ascii_lowercase(),
                })
            }
            _ => Err(TlsError::BadToken),
        }
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.ca_hash, self.id, self.secret
        )
    }
}

/// Cryptographically secure random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system's random source is available");
    buf
}

/// Reads the identity (role from OU, name from CN) out of a certificate.
pub fn identity(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| TlsError::NoIdentity)?;
    let subject = parsed.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(TlsError::NoIdentity)?;
    let role = match subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
    {
        Some("head") => Role::Head,
        Some("edge") => Role::Edge,
        _ => return Err(TlsError::NoIdentity),
    };
    Ok(Identity {
        role,
        name: name.to_string(),
        key: Sha256::digest(parsed.tbs_certificate.subject_pki.raw).to_vec(),
    })
}

/// When a certificate stops being valid.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<OffsetDateTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    OffsetDateTime::from_unix_timestamp(parsed.validity().not_after.timestamp()).ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// Server side: present `cert`; ask for a client certificate from `ca`, but let clients without
/// one in (they may only join).
pub fn server_config(
    ca: &CertificateDer<'static>,
    cert: &KeyedCert,
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = alpn_protocols();
    Ok(config)
}

/// The head API's HTTPS server side: TLS 1.2 or 1.3, HTTP/1.1, no client certificates.
pub fn api_server_config(cert: &KeyedCert) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A certificate chain and key from PEM files (a configured certificate for the head API).
pub fn load_keyed_cert(cert: &Path, key: &Path) -> Result<KeyedCert, TlsError> {
    let bad = |path: &Path, what: &str| TlsError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    };
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|_| bad(cert, "cannot read PEM certificates"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad(cert, "not a PEM certificate chain"))?;
    if chain.is_empty() {
        return Err(bad(cert, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|_| bad(key, "not a PEM private key"))?;
    Ok(KeyedCert { chain, key })
}

/// A client configuration trusting only `ca`, without a client certificate (HTTPS clients).
pub fn https_client_config(ca: &CertificateDer<'static>) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
}

/// Client side with a certificate: trust only `ca`.
pub fn client_config(
    ca: &CertificateDer<'static>,
    cert: &KeyedCert,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = alpn_protocols();
    Ok(config)
}

/// Client side for joining: no certificate yet; trust the head only if its chain carries a CA
/// whose SHA-256 is `ca_hash` (from the token) and the leaf is signed by it. The flag is set
/// when a head was refused for presenting another CA.
pub fn join_client_config(
    ca_hash: &str,
) -> Result<(rustls::ClientConfig, Arc<AtomicBool>), TlsError> {
    let mismatch = Arc::new(AtomicBool::new(false));
    let verifier = PinnedCa {
        pin: ca_hash.to_ascii_lowercase(),
        provider: provider(),
        mismatch: mismatch.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn_protocols();
    Ok((config, mismatch))
}

#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
    mismatch: Arc<AtomicBool>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                self.mismatch.store(true, Ordering::SeqCst);
                rustls::Error::General(
                    "the head's CA does not match the CA hash in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
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

/// Parses the first certificate of a PEM text.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Io {
        path: "(certificate)".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })
}

/// Loads a node's key and certificate (`node.pem`) and the CA (`ca.crt`) from `dir`, if joined.
pub fn load_node_cert(
    dir: &Path,
) -> Result<Option<(KeyedCert, CertificateDer<'static>)>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let node_path = dir.join("node.pem");
    if !node_path.exists() {
        return Ok(None);
    }
    let pem = read(&node_path)?;
    let bad = |what: &str| TlsError::Io {
        path: node_path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    };
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad("no certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad("no private key"))?;
    let ca = pem_to_der(&read(&dir.join("ca.crt"))?)?;
    Ok(Some((
        KeyedCert {
            chain: vec![cert],
            key,
        },
        ca,
    )))
}

/// What tells whether the files [`load_node_cert`] reads were replaced since: their inode
/// numbers and modification times (a renewal renames new files into place). None when either
/// is missing.
pub fn node_cert_stamp(dir: &Path) -> Option<[(u64, std::time::SystemTime); 2]> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |name: &str| {
        let meta = std::fs::metadata(dir.join(name)).ok()?;
        Some((meta.ino(), meta.modified().ok()?))
    };
    Some([stamp("node.pem")?, stamp("ca.crt")?])
}

/// Stores a node's key and certificate together in `node.pem` (mode 0600, one atomic rename, so
/// a renewal can never leave a certificate beside the wrong key) and the CA in `ca.crt`.
pub fn save_node_cert(
    dir: &Path,
    key: &KeyPair,
    cert_pem: &str,
    ca_pem: &str,
) -> Result<(), TlsError> {
    let write = |name: &str, data: &str, mode| {
        let path = dir.join(name);
        crate::fsutil::write_atomic(&path, data.as_bytes(), mode)
            .map_err(|source| io_err(&path, source))
    };
    write("ca.crt", ca_pem, 0o644)?;
    write(
        "node.pem",
        &format!("{}{cert_pem}", key.serialize_pem()),
        0o600,
    )
}

/// When a certificate should be renewed: once two thirds of its lifetime have passed.
pub fn renew_at(cert: &CertificateDer<'_>) -> Option<OffsetDateTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let from = parsed.validity().not_before.timestamp();
    let to = parsed.validity().not_after.timestamp();
    OffsetDateTime::from_unix_timestamp(to - (to - from) / 3).ok()
}

fn dn(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "edgesync");
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    // Tolerate clocks running a little behind, without eating into short lifetimes.
    params.not_before = now - (lifetime / 10).min(Duration::from_secs(3600));
    params.not_after = now + lifetime;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_bytes::<16>()));
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| io_err(path, source))
}

fn io_err(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let token = JoinToken::generate(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        for bad in [
            "",
            "edgesync1.x.y.z",
            &token.to_string().replace("edgesync1", "k10"),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issued_certificates_carry_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let head = ca.issue_head("head-a").unwrap();
        let head_id = identity(&head.chain[0]).unwrap();
        assert_eq!(
            (head_id.role, head_id.name.as_str()),
            (Role::Head, "head-a")
        );
        assert_eq!(head_id.key.len(), 32);
        let (_, csr) = new_request("ignored").unwrap();
        let edge = pem_to_der(&ca.sign_edge(&csr, "edge01", NODE_CERT_LIFETIME).unwrap()).unwrap();
        let id = identity(&edge).unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Edge, "edge01"));
        assert!(id.may_access("team-a/edge01") && !id.may_access("team-a/edge02"));
        let registry_named_like_an_edge = Identity {
            name: "registry".into(),
            ..id.clone()
        };
        assert!(!registry_named_like_an_edge.may_access(crate::registry::KEY));
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(again.hash(), ca.hash(), "the CA survives a restart");
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
