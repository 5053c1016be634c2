//! Edge wiring: join once with a token, then dial the heads with backoff, and keep the
//! kubelet's static pod manifests equal to the documents, with no network needed.

pub mod join;
pub mod manifests;
pub mod policy;

use crate::config::EdgeConfig;
use crate::control;
use crate::crd::{POD_APPLIED, POD_REFUSED, PodState};
use crate::fsutil;
use crate::input::{self, Rules};
use crate::link;
use crate::node::{AppliedPod, Node, NodeError};
use crate::store::{OwnedFile, Store, StoreError};
use crate::transport::TransportError;
use crate::transport::tls::{self, Role, TlsError};
use manifests::Desired;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Errors starting or running an edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// State directory problem.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The head refused to let this node join.
    #[error("join refused by {head}: {reason}")]
    JoinRefused {
        /// Head address.
        head: String,
        /// The head's reason.
        reason: String,
    },
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// QUIC.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Node core.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Control socket.
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

/// A running edge.
pub struct Edge {
    node: Node,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Edge {
    /// Joins if needed, loads the cache, writes manifests from it at once, then links to the heads.
    pub async fn start(config: EdgeConfig) -> Result<Edge, EdgeError> {
        let dir = &config.state_dir;
        input::check_subdomain(&config.node_name)
            .map_err(|r| EdgeError::Config(format!("--node-name: {r}")))?;
        fsutil::ensure_dir(dir, 0o700).map_err(|source| io_err(dir, source))?;
        fsutil::ensure_dir(&config.manifest_dir, 0o755)
            .map_err(|source| io_err(&config.manifest_dir, source))?;
        let shutdown = CancellationToken::new();
        join::credentials(&config, &shutdown).await?;
        let store = Store::open(dir)?;
        let rules = Rules {
            default_namespace: "default".into(),
            privileged_namespaces: config.privileged_namespaces.clone(),
        };
        let node = Node::open(Role::Edge, &config.node_name, store, rules).await?;
        let mut tasks = JoinSet::new();
        let reconciler = Reconciler {
            node: node.clone(),
            dir: config.manifest_dir.clone(),
        };
        reconciler.run_once().await;
        tasks.spawn(reconciler.run(config.drift_interval, shutdown.child_token()));
        let mut targets = config.heads.clone();
        targets.extend(config.peers.iter().cloned());
        let state = config.state_dir.clone();
        let client: link::TlsSource = Arc::new(move || {
            let (cert, ca) = tls::load_node_cert(&state)
                .map_err(|e| e.to_string())?
                .ok_or("the node certificate is gone from the state dir")?;
            tls::client_config(&ca, &cert).map_err(|e| e.to_string())
        });
        tasks.spawn(link::dial(
            node.clone(),
            targets,
            client,
            shutdown.child_token(),
        ));
        tasks.spawn(join::renew_loop(config.clone(), shutdown.child_token()));
        tasks.spawn(
            control::serve(&config.socket, node.clone(), None, shutdown.child_token()).await?,
        );
        info!(node = %config.node_name, manifests = %config.manifest_dir.display(), "edge ready");
        Ok(Edge {
            node,
            shutdown,
            tasks,
        })
    }

    /// The node core.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops linking and reconciling (manifests stay, so the kubelet keeps the pods running).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

fn io_err(path: &Path, source: std::io::Error) -> EdgeError {
    EdgeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Keeps the manifest directory equal to the documents of this node.
struct Reconciler {
    node: Node,
    dir: PathBuf,
}

impl Reconciler {
    async fn run(self, drift_interval: Duration, shutdown: CancellationToken) {
        let mut changes = self.node.subscribe();
        let mut tick = tokio::time::interval(drift_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.recv() => while changes.try_recv().is_ok() {},
                _ = tick.tick() => {}
            }
            self.run_once().await;
        }
    }

    async fn run_once(&self) {
        if let Err(e) = self.reconcile().await {
            warn!(error = %e, "reconcile failed; will retry");
        }
    }

    async fn reconcile(&self) -> Result<(), EdgeError> {
        let node = &self.node;
        let mut desired = Vec::new();
        let mut states: Vec<(String, i64, Vec<PodState>)> = Vec::new();
        let mut refused_files = Vec::new();
        for key in node.keys() {
            if crate::model::split_key(&key).map(|(_, n)| n) != Some(node.name()) {
                continue;
            }
            let Some((view, _)) = node.view(&key).await? else {
                continue;
            };
            let privileged =
                view.privileged || node.rules().privileged_namespaces.contains(&view.namespace);
            let mut pods = Vec::new();
            for (name, pod) in &view.pods {
                let checked = input::normalise_pod(pod, &view.name, privileged).and_then(
                    |(pod_name, pod)| match pod_name == *name {
                        true => Ok(pod),
                        false => Err((
                            ".metadata.name".into(),
                            format!("{pod_name:?} differs from the pod's key {name:?}"),
                        )),
                    },
                );
                let state = match checked {
                    Ok(pod) => {
                        desired.push(Desired::render(&view.namespace, &view.name, name, &pod));
                        PodState {
                            name: name.clone(),
                            state: POD_APPLIED.into(),
                            reason: None,
                        }
                    }
                    Err((field, reason)) => {
                        refused_files.push(manifests::file_name(&view.namespace, name));
                        PodState {
                            name: name.clone(),
                            state: POD_REFUSED.into(),
                            reason: Some(format!("spec.pods[{name}]{field}: {reason}")),
                        }
                    }
                };
                pods.push(state);
            }
            states.push((key, view.generation, pods));
        }
        let owned = node.store().owned_files().await?;
        let plan = manifests::plan(&desired, &owned, &refused_files, |f| {
            manifests::inspect(&self.dir, f)
        });
        for want in &plan.write {
            let Some(path) = manifests::path_in(&self.dir, &want.file) else {
                continue;
            };
            node.store()
                .own_file(OwnedFile {
                    file: want.file.clone(),
                    key: want.key.clone(),
                    pod: want.pod.clone(),
                    sha256: want.sha256(),
                })
                .await?;
            fsutil::write_atomic(&path, &want.content, 0o600)
                .map_err(|source| io_err(&path, source))?;
            info!(file = %path.display(), doc = %want.key, "manifest written");
        }
        for gone in &plan.remove {
            if let Some(path) = manifests::path_in(&self.dir, &gone.file) {
                match std::fs::remove_file(&path) {
                    Ok(()) => info!(file = %path.display(), "manifest removed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(io_err(&path, source)),
                }
            }
            node.store().disown_file(gone.file.clone()).await?;
        }
        for replaced in &plan.disown {
            warn!(file = %replaced.file, "someone replaced this manifest with their own content; leaving it and forgetting it");
            node.store().disown_file(replaced.file.clone()).await?;
        }
        for blocked in &plan.blocked {
            warn!(file = %blocked.file, "a file edgesync did not write has this name; leaving it alone");
            for (key, _, pods) in &mut states {
                if *key == blocked.key
                    && let Some(p) = pods.iter_mut().find(|p| p.name == blocked.pod)
                {
                    p.state = POD_REFUSED.into();
                    p.reason = Some(format!(
                        "{} exists in the manifest directory and was not written by edgesync",
                        blocked.file
                    ));
                }
            }
        }
        let kept: Vec<&str> = owned
            .iter()
            .map(|o| o.file.as_str())
            .filter(|f| refused_files.iter().any(|r| r == f))
            .collect();
        let mut applied = Vec::new();
        for (key, generation, pods) in &states {
            node.report_status(key, *generation, pods).await?;
            let namespace = crate::model::split_key(key).map_or("", |(ns, _)| ns);
            for p in pods {
                let file = manifests::file_name(namespace, &p.name);
                let written = p.state == POD_APPLIED || kept.contains(&file.as_str());
                applied.push(AppliedPod {
                    edgenode: key.clone(),
                    pod: p.name.clone(),
                    file: written.then_some(file),
                    state: p.state.clone(),
                    reason: p.reason.clone(),
                });
            }
        }
        node.set_applied(applied);
        Ok(())
    }
}
