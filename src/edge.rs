//! Edge wiring: join once with a token, then dial the heads with backoff, and keep the
//! kubelet's static pod manifests equal to the documents, with no network needed.

pub mod join;
pub mod manifests;
pub mod policy;
pub mod reconcile;

use crate::config::EdgeConfig;
use crate::control;
use crate::daemon::{DaemonError, Tasks, io_err};
use crate::fsutil;
use crate::input::{self, Rules};
use crate::link;
use crate::node::Node;
use crate::store::Store;
use crate::transport::tls::{self, Role};
use reconcile::Reconciler;
use std::sync::Arc;
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
        match manifests::remove_temp_files(&config.manifest_dir) {
            Ok(removed) => {
                for file in removed {
                    info!(%file, "removed a temp file left by a crash");
                }
            }
            Err(e) => {
                warn!(dir = %config.manifest_dir.display(), error = %e, "cannot clean up temp files")
            }
        }
        let mut reconciler = Reconciler::new(node.clone(), config.manifest_dir.clone());
        reconciler.run_once(None).await;
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
