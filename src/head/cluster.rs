//! The cluster a head works with: the client (from a kubeconfig or the service account), the
//! CA every head of the cluster shares (kept in a Secret), and the parameters of every write
//! edgesync makes to the API server.

use crate::daemon::DaemonError;
use crate::transport::tls::{Ca, TlsError};
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::path::Path;
use tracing::{info, warn};

/// Field manager named on every write edgesync makes to the API server.
pub const FIELD_MANAGER: &str = "edgesync";
/// Parameters of a patch edgesync makes: its field manager named.
pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Parameters of a create or replace edgesync makes: its field manager named.
pub fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

impl From<ClusterError> for crate::daemon::DaemonError {
    fn from(e: ClusterError) -> Self {
        crate::daemon::DaemonError::Cluster(Box::new(e))
    }
}

/// Errors reaching the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// Where it came from.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// The shared CA Secret could not be read, created or used.
    #[error("CA Secret {namespace}/{CA_SECRET}: {reason}")]
    CaSecret {
        /// Its namespace.
        namespace: String,
        /// Why.
        reason: String,
    },
    /// The shared CA Secret lacks a key of its data.
    #[error("CA Secret {namespace}/{CA_SECRET}: has no {field}")]
    CaSecretField {
        /// Its namespace.
        namespace: String,
        /// The missing key (`tls.crt`, `tls.key`), or one that is not UTF-8.
        field: &'static str,
    },
    /// The shared CA Secret holds no usable CA certificate and key.
    #[error("CA Secret {namespace}/{CA_SECRET}: {source}")]
    CaSecretUnusable {
        /// Its namespace.
        namespace: String,
        /// Why the certificate or key was refused.
        #[source]
        source: TlsError,
    },
}

/// Secret (type kubernetes.io/tls) holding the CA that every head of a cluster uses.
pub const CA_SECRET: &str = "edgesync-ca";

/// The CA all heads of the cluster share: the one in Secret `namespace/edgesync-ca`, or, when
/// there is none yet, this head's (created if need be) stored there, create-if-absent, so heads
/// starting together cannot end up with different CAs. Kept in `dir` as well; a different CA
/// already in `dir` is an error rather than something to overwrite.
pub async fn shared_ca(
    client: &kube::Client,
    namespace: &str,
    dir: &Path,
) -> Result<Ca, DaemonError> {
    let err = |reason: String| ClusterError::CaSecret {
        namespace: namespace.to_string(),
        reason,
    };
    let api_err = |e: kube::Error| match e {
        kube::Error::Api(s) if s.code == 404 => {
            err(format!("{} (see --cluster-namespace)", s.message))
        }
        kube::Error::Api(s) => err(s.message),
        e => err(e.to_string()),
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let local = Ca::load(dir)?;
    let found = secrets.get_opt(CA_SECRET).await.map_err(api_err)?;
    let ca = match found {
        Some(secret) => ca_of(&secret, namespace)?,
        None => {
            let ca = match &local {
                Some(ca) => Ca::from_pem(&ca.cert_pem, ca.key_pem())?,
                None => Ca::generate()?,
            };
            let data = [
                ("tls.crt", &ca.cert_pem),
                ("tls.key", &ca.key_pem().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(CA_SECRET.into()),
                    labels: Some(
                        [("app.kubernetes.io/name".into(), "edgesync-head".into())].into(),
                    ),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Secret::default()
            };
            let params = post_params();
            match secrets.create(&params, &secret).await {
                Ok(_) => {
                    info!(secret = CA_SECRET, %namespace, "stored this head's CA for the other heads");
                    ca
                }
                // Another head was first: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let secret = secrets.get(CA_SECRET).await.map_err(api_err)?;
                    ca_of(&secret, namespace)?
                }
                Err(e) => return Err(api_err(e).into()),
            }
        }
    };
    match local {
        Some(local) if local.hash() != ca.hash() => Err(err(format!(
            "differs from the CA in {} (ca.crt); edges that trust one would not trust the other. Move one of them away",
            dir.display()
        ))
        .into()),
        Some(_) => Ok(ca),
        None => {
            ca.save(dir)?;
            Ok(ca)
        }
    }
}

/// The CA that Secret `namespace/edgesync-ca` holds.
fn ca_of(secret: &Secret, namespace: &str) -> Result<Ca, ClusterError> {
    let field = |field: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(field))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .ok_or_else(|| ClusterError::CaSecretField {
                namespace: namespace.to_string(),
                field,
            })
    };
    Ca::from_pem(&field("tls.crt")?, &field("tls.key")?).map_err(|source| {
        ClusterError::CaSecretUnusable {
            namespace: namespace.to_string(),
            source,
        }
    })
}

/// The cluster the head works with.
#[derive(Clone)]
pub struct Cluster {
    /// Client with the head's own credentials.
    pub client: kube::Client,
    /// The API server's URL as the head reaches it.
    pub server: String,
    /// The CA the head trusts for it (PEM), if any.
    pub ca_pem: Option<String>,
}

/// The cluster: from `kubeconfig` if given, else `KUBECONFIG`, else the in-cluster service
/// account. None when none of those exists: the head runs standalone.
pub async fn cluster(kubeconfig: Option<&Path>) -> Result<Option<Cluster>, ClusterError> {
    let from_file = |path: String| async move {
        let err = |reason: String| ClusterError::Kubeconfig {
            path: path.clone(),
            reason,
        };
        let file = kube::config::Kubeconfig::read_from(&path).map_err(|e| err(e.to_string()))?;
        let options = kube::config::KubeConfigOptions::default();
        kube::Config::from_custom_kubeconfig(file, &options)
            .await
            .map_err(|e| err(e.to_string()))
    };
    let config = match (kubeconfig, std::env::var("KUBECONFIG")) {
        (Some(path), _) => from_file(path.display().to_string()).await?,
        (None, Ok(path)) if !path.is_empty() => from_file(path).await?,
        _ if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => kube::Config::incluster()
            .map_err(|e| ClusterError::Kubeconfig {
                path: "(in-cluster service account)".into(),
                reason: e.to_string(),
            })?,
        _ => return Ok(None),
    };
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let ca_pem = config.root_cert.as_ref().map(|certs| {
        certs
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect::<String>()
    });
    let client = kube::Client::try_from(config).map_err(|e| ClusterError::Kubeconfig {
        path: kubeconfig.map_or("(KUBECONFIG)".into(), |p| p.display().to_string()),
        reason: e.to_string(),
    })?;
    Ok(Some(Cluster {
        client,
        server,
        ca_pem,
    }))
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A resource type the heads keep caches of.
pub trait Cached:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Cached for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// A cache of `api`'s objects, kept up to date by a reflector running as a daemon task, which
/// hands each watch event to `on_event` as well.
pub fn cache<K: Cached>(
    api: Api<K>,
    config: watcher::Config,
    tasks: &mut crate::daemon::Tasks,
    mut on_event: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> Store<K> {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let shutdown = tasks.token();
    tasks.spawn(async move {
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    None => return,
                    Some(Err(e)) => warn!(kind = K::kind(&()).as_ref(), error = %e, "watch failed; retrying"),
                    Some(Ok(event)) => on_event(&event),
                },
            }
        }
    });
    reader
}
