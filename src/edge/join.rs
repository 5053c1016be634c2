//! The edge's certificate: joining once with a token (pinning the head's CA), and renewing
//! it over mutual TLS once two thirds of its lifetime have passed, so it never expires while
//! the edge is in touch with a head.

use crate::config::EdgeConfig;
use crate::daemon::{DaemonError, io_err};
use crate::sync::wire::{Frame, MAX_FIRST_FRAME, read_frame, write_frame};
use crate::transport::tls::{self, JoinToken, KeyedCert, TlsError};
use crate::transport::{self, Backoff};
use sha2::Digest;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The node's certificate: stored from an earlier join, or obtained now with the token. A
/// stored certificate is used even if it expired, so the edge keeps serving its pods from the
/// cache; the renewal loop joins again with the token when a head answers.
pub async fn credentials(
    config: &EdgeConfig,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    if let Some((cert, _)) = tls::load_node_cert(&config.state_dir)? {
        let identity = tls::identity(&cert.chain[0])?;
        if identity.name != config.node_name {
            return Err(DaemonError::Config(format!(
                "--node-name is {:?} but {} belongs to node {:?}; use that name or another --state-dir",
                config.node_name,
                config.state_dir.display(),
                identity.name
            )));
        }
        if expired(&cert) {
            warn!(
                "the node certificate has expired; pods keep running from the cache, and the edge joins again when a head answers (needs --token)"
            );
        } else if config.token.is_some() {
            info!("already joined; the token is not needed any more");
        }
        return Ok(());
    }
    let Some(token) = configured_token(config)? else {
        return Err(DaemonError::Config(format!(
            "{} holds no certificate yet: give --token (from <head state dir>/join-token or `edgesync token create`) to join",
            config.state_dir.display()
        )));
    };
    join(config, &token, shutdown).await
}

fn expired(cert: &KeyedCert) -> bool {
    tls::not_after(&cert.chain[0]).is_some_and(|t| t <= time::OffsetDateTime::now_utc())
}

/// The join token from `--token` or `--token-file`, if either is set.
fn configured_token(config: &EdgeConfig) -> Result<Option<JoinToken>, DaemonError> {
    let text = match (&config.token, &config.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| io_err(path, source))?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    Ok(Some(JoinToken::parse(&text)?))
}

/// Why the certificate could not be renewed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// There is no certificate in the state dir.
    #[error("no certificate to renew")]
    NoCertificate {
        /// The state dir.
        dir: PathBuf,
    },
    /// The certificate, its key or the CA could not be read, used or stored.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No `--head` resolved to an address.
    #[error("no head address resolved")]
    NoHead,
    /// The head answered no.
    #[error("{head}: {reason}")]
    Refused {
        /// The head's address.
        head: SocketAddr,
        /// The head's reason.
        reason: String,
    },
    /// The head did not answer, or not with a certificate.
    #[error("{head}: {reason}")]
    Unreachable {
        /// The head's address.
        head: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The head issued a certificate for another node name or role.
    #[error("{head} issued a certificate for another identity")]
    OtherIdentity {
        /// The head's address.
        head: SocketAddr,
    },
    /// The certificate had expired and joining again with the token failed.
    #[error(transparent)]
    Rejoin(#[from] DaemonError),
}

/// Why a certificate request did not succeed.
enum Attempt {
    /// The head answered no: give up.
    Refused(String),
    /// No answer: try another head or later.
    Unreachable(String),
}

/// Presents the token to whichever head answers and stores the certificate it issues.
async fn join(
    config: &EdgeConfig,
    token: &JoinToken,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let (key, csr) = tls::new_request(&config.node_name)?;
    let request = Frame::JoinRequest {
        node: config.node_name.clone(),
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        csr,
        advertise: config.advertise_address.clone().unwrap_or_default(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        for addr in transport::resolve(&config.heads).await {
            let (client, pin_failed) = tls::join_client_config(&token.ca_hash)?;
            let outcome = match request_cert(addr, config.source_address, client, &request, &token.ca_hash).await {
                Err(Attempt::Unreachable(_)) if pin_failed.load(Ordering::SeqCst) => Err(Attempt::Refused(
                    "the head's CA certificate does not match the CA hash in the token; check the token and --head".into(),
                )),
                other => other,
            };
            match outcome {
                Ok((cert_pem, ca_pem)) => {
                    tls::save_node_cert(&config.state_dir, &key, &cert_pem, &ca_pem)?;
                    info!(head = %addr, "joined");
                    return Ok(());
                }
                Err(Attempt::Refused(reason)) => {
                    return Err(DaemonError::JoinRefused {
                        head: addr.to_string(),
                        reason,
                    });
                }
                Err(Attempt::Unreachable(reason)) => {
                    warn!(head = %addr, %reason, "cannot join yet")
                }
            }
        }
        let delay = backoff.next_delay();
        crate::runtime::notify_waiting(
            "waiting for a head to answer, to join (nothing to serve before that)",
            delay + Duration::from_secs(30),
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Err(DaemonError::Config("stopped before joining".into())),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Sends one certificate request (join or renewal) to `addr` and returns the certificate and
/// CA PEMs, checking that the CA is the one expected (`ca_hash`). Dials from `source` if given.
async fn request_cert(
    addr: SocketAddr,
    source: Option<IpAddr>,
    client: rustls::ClientConfig,
    request: &Frame,
    ca_hash: &str,
) -> Result<(String, String), Attempt> {
    let unreachable = |e: &dyn std::fmt::Display| Attempt::Unreachable(e.to_string());
    let endpoint = transport::client(addr, source).map_err(|e| unreachable(&e))?;
    let conn = transport::connect(&endpoint, addr, client)
        .await
        .map_err(|e| unreachable(&e))?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
        write_frame(&mut send, request)
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = send.finish();
        read_frame(&mut recv, MAX_FIRST_FRAME)
            .await
            .map_err(|e| unreachable(&e))
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| Attempt::Unreachable("no answer within 10s".into()))??;
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    match reply {
        Some(Frame::JoinAccepted { cert_pem, ca_pem }) => {
            let ca = tls::pem_to_der(&ca_pem).map_err(|e| Attempt::Refused(e.to_string()))?;
            if hex::encode(sha2::Sha256::digest(&ca)) != ca_hash {
                return Err(Attempt::Refused(
                    "the head sent a CA that does not match the pinned one".into(),
                ));
            }
            Ok((cert_pem, ca_pem))
        }
        Some(Frame::Error { message }) => Err(Attempt::Refused(message)),
        other => Err(Attempt::Unreachable(format!("unexpected answer {other:?}"))),
    }
}

/// Renews the certificate from whichever head answers once two thirds of its lifetime have
/// passed, retrying with backoff until `shutdown`. If it expired anyway (the edge was cut off
/// too long), joins again with the configured token, if any.
pub async fn renew_loop(config: EdgeConfig, shutdown: CancellationToken) {
    let dir = &config.state_dir;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        let now = time::OffsetDateTime::now_utc();
        let cert = tls::load_node_cert(dir).ok().flatten().map(|(c, _)| c);
        let lapsed = cert.as_ref().is_some_and(expired);
        let due = cert
            .as_ref()
            .and_then(|c| tls::renew_at(&c.chain[0]))
            .map(|at| at - now);
        let wait = match due {
            // Re-check at least hourly, so a changed clock or file is noticed.
            Some(d) if d.is_positive() => d.unsigned_abs().min(Duration::from_secs(3600)),
            None => Duration::from_secs(3600),
            Some(_) => {
                let outcome = if lapsed {
                    match configured_token(&config) {
                        Ok(Some(token)) => join(&config, &token, &shutdown).await,
                        Ok(None) => Err(DaemonError::Config(
                            "the node certificate has expired; restart with --token to join again"
                                .into(),
                        )),
                        Err(e) => Err(e),
                    }
                    .map_err(JoinError::Rejoin)
                } else {
                    renew(dir, &config.heads, config.source_address).await
                };
                match outcome {
                    Ok(()) => {
                        backoff.reset();
                        info!(rejoined = lapsed, "certificate renewed");
                        Duration::from_secs(1)
                    }
                    Err(e) => {
                        warn!(error = %e, "certificate renewal failed; will retry");
                        backoff.next_delay()
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Renews the certificate in `dir` from whichever of `heads` answers first; else the last
/// head's failure.
async fn renew(dir: &Path, heads: &[String], source: Option<IpAddr>) -> Result<(), JoinError> {
    let (cert, ca) = tls::load_node_cert(dir)?.ok_or_else(|| JoinError::NoCertificate {
        dir: dir.to_path_buf(),
    })?;
    let name = tls::identity(&cert.chain[0])?.name;
    let ca_hash = hex::encode(sha2::Sha256::digest(&ca));
    let (key, csr) = tls::new_request(&name)?;
    let request = Frame::Renew { csr };
    let mut last = JoinError::NoHead;
    for head in transport::resolve(heads).await {
        let client = tls::client_config(&ca, &cert)?;
        last = match request_cert(head, source, client, &request, &ca_hash).await {
            Ok((cert_pem, ca_pem)) => {
                let issued = tls::pem_to_der(&cert_pem)?;
                let same = tls::identity(&issued).map(|id| id.name == name);
                if same.is_ok_and(|same| same) {
                    return Ok(tls::save_node_cert(dir, &key, &cert_pem, &ca_pem)?);
                }
                JoinError::OtherIdentity { head }
            }
            Err(Attempt::Refused(reason)) => JoinError::Refused { head, reason },
            Err(Attempt::Unreachable(reason)) => JoinError::Unreachable { head, reason },
        };
    }
    Err(last)
}
