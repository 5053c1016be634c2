//! Edge wiring: join once with a token, then dial the heads with backoff, and keep the
//! kubelet's static pod manifests equal to the documents, with no network needed.

pub mod join;
pub mod manifests;
pub mod policy;

use crate::config::EdgeConfig;
use crate::control;
use crate::crd::{POD_APPLIED, POD_REFUSED, PodState};
use crate::daemon::{DaemonError, Tasks, io_err};
use crate::fsutil;
use crate::input::{self, Rules};
use crate::link;
use crate::node::{AppliedPod, Node};
use crate::store::{OwnedFile, Store};
use crate::transport::tls::{self, Role};
use manifests::Desired;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A running edge.
pub struct Edge {
    node: Node,
    tasks: Tasks,
}

impl Edge {
    /// Joins if needed, loads the cache, writes manifests from it at once, then links to the heads.
    pub async fn start(config: EdgeConfig) -> Result<Edge, DaemonError> {
        let dir = &config.state_dir;
        input::check_subdomain(&config.node_name)
            .map_err(|r| DaemonError::Config(format!("--node-name: {r}")))?;
        fsutil::ensure_dir(dir, 0o700).map_err(|source| io_err(dir, source))?;
        fsutil::ensure_dir(&config.manifest_dir, 0o755)
            .map_err(|source| io_err(&config.manifest_dir, source))?;
        let mut tasks = Tasks::default();
        join::credentials(&config, &tasks.token()).await?;
        let store = Store::open(dir)?;
        let rules = Rules {
            default_namespace: "default".into(),
            privileged_namespaces: config.privileged_namespaces.clone(),
        };
        let node = Node::open(Role::Edge, &config.node_name, store, rules).await?;
        node.set_advertise(
            config
                .advertise_address
                .as_deref()
                .and_then(|a| a.parse().ok()),
        );
        let reconciler = Reconciler {
            node: node.clone(),
            dir: config.manifest_dir.clone(),
        };
        reconciler.run_once().await;
        tasks.spawn(reconciler.run(config.drift_interval, tasks.token()));
        let mut targets = config.heads.clone();
        targets.extend(config.peers.iter().cloned());
        let state = config.state_dir.clone();
        let metrics_node = node.clone();
        let client: link::TlsSource = Arc::new(move || {
            let (cert, ca) = tls::load_node_cert(&state)
                .map_err(|e| e.to_string())?
                .ok_or("the node certificate is gone from the state dir")?;
            metrics_node.metrics().cert_expires("node", &cert.chain[0]);
            tls::client_config(&ca, &cert).map_err(|e| e.to_string())
        });
        tasks.spawn(link::dial(node.clone(), targets, client, tasks.token()));
        tasks.spawn(join::renew_loop(config.clone(), tasks.token()));
        tasks.spawn(control::serve(&config.socket, node.clone(), None, tasks.token()).await?);
        info!(node = %config.node_name, manifests = %config.manifest_dir.display(), "edge ready");
        Ok(Edge { node, tasks })
    }

    /// The node core.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops linking and reconciling (manifests stay, so the kubelet keeps the pods running).
    pub async fn shutdown(self) {
        self.tasks.shutdown().await;
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
        let metrics = self.node.metrics();
        metrics.reconcile_runs.inc();
        if let Err(e) = self.reconcile().await {
            metrics.reconcile_failures.inc();
            warn!(error = %e, "reconcile failed; will retry");
        }
    }

    async fn reconcile(&self) -> Result<(), DaemonError> {
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
                            phase: None,
                        }
                    }
                    Err((field, reason)) => {
                        refused_files.push(manifests::file_name(&view.namespace, name));
                        PodState {
                            name: name.clone(),
                            state: POD_REFUSED.into(),
                            reason: Some(format!("spec.pods[{name}]{field}: {reason}")),
                            phase: None,
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
        let refused = applied.iter().filter(|p| p.state == POD_REFUSED).count();
        node.metrics().pods_refused.set(refused as i64);
        node.set_applied(applied);
        Ok(())
    }
}
