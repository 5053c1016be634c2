//! Edge wiring: join once with a token, then dial the heads with backoff, and keep the
//! kubelet's static pod manifests equal to the documents, with no network needed.

pub mod join;
pub mod manifests;
pub mod reconcile;

use crate::config::EdgeConfig;
use crate::control;
use crate::daemon::{self, DaemonError, Tasks, io_err};
use crate::fsutil;
use crate::input::{self, Rules};
use crate::link;
use crate::node::Node;
use crate::node::journal::Recorder;
use crate::node::looks::{self, Follower};
use crate::store::Store;
use crate::transport::tls::{self, Role};
use reconcile::Reconciler;
use std::sync::Arc;
use tracing::{info, warn};

/// A running edge.
pub struct Edge {
    node: Node,
    tasks: Tasks,
    /// Held until the edge stops.
    _lock: daemon::StateLock,
}

/// Creates the manifest dir if missing and checks a file can be written in it (with the name
/// pattern of edgesync's own temp files, removed at once).
fn check_writable(dir: &std::path::Path) -> Result<(), DaemonError> {
    fsutil::ensure_dir(dir, 0o755).map_err(|source| io_err(dir, source))?;
    tempfile::Builder::new()
        .prefix(fsutil::TEMP_PREFIX)
        .suffix(fsutil::TEMP_SUFFIX)
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| {
            DaemonError::Config(format!("manifest dir {}: not writable: {e}", dir.display()))
        })
}

impl Edge {
    /// Joins if needed, loads the cache, writes manifests from it at once, then links to the heads.
    pub async fn start(config: EdgeConfig) -> Result<Edge, DaemonError> {
        let dir = &config.state_dir;
        input::check_subdomain(&config.node_name)
            .map_err(|r| DaemonError::Config(format!("--node-name: {r}")))?;
        // Everything this edge needs is checked before it joins, so a start that fails never
        // uses up its node name: its own state dir, a writable manifest dir, its socket.
        let lock = daemon::lock_state_dir(dir, "edge")?;
        check_writable(&config.manifest_dir)?;
        let store = Store::open(dir)?;
        let rules = Rules {
            default_namespace: "default".into(),
            privileged_namespaces: config.privileged_namespaces.clone(),
        };
        let node = Node::open(Role::Edge, &config.node_name, store, rules).await?;
        let mut tasks = Tasks::default();
        // Bound now, served once the edge is up: a CLI that gets an answer finds it started.
        let control = control::serve(
            &config.socket,
            node.clone(),
            control::edge_routes(node.clone()),
            tasks.token(),
        )
        .await?;
        join::credentials(&config, &tasks.token()).await?;
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
        let journal: Box<dyn Follower> = Box::new(Recorder::default());
        tasks.spawn(looks::follow(node.clone(), vec![journal], tasks.token()));
        let mut targets = config.heads.clone();
        targets.extend(config.peers.iter().cloned());
        let state = config.state_dir.clone();
        let metrics_node = node.clone();
        // Built again only when a renewal replaced the files: an edge that comes back to a
        // busy head may dial many times, and each build parses the key and the CA.
        let built = std::sync::Mutex::new(None);
        let client: link::TlsSource = Arc::new(move || {
            let stamp = tls::node_cert_stamp(&state);
            let mut built = crate::node::lock(&built);
            if let Some((at, config)) = &*built
                && stamp.is_some()
                && *at == stamp
            {
                return Ok(rustls::ClientConfig::clone(config));
            }
            let (cert, ca) = tls::load_node_cert(&state)?
                .ok_or_else(|| link::LinkError::NoCertificate { dir: state.clone() })?;
            metrics_node.metrics().cert_expires("node", &cert.chain[0]);
            let config = tls::client_config(&ca, &cert)?;
            *built = Some((stamp, config.clone()));
            Ok(config)
        });
        tasks.spawn(link::dial(
            node.clone(),
            targets,
            client,
            config.source_address,
            tasks.token(),
        ));
        tasks.spawn(join::renew_loop(config.clone(), tasks.token()));
        tasks.spawn(control);
        let render: control::RenderMetrics = {
            let node = node.clone();
            Arc::new(move || {
                let node = node.clone();
                Box::pin(async move { node.metrics_text().await })
            })
        };
        if let Some((_, served)) =
            control::serve_metrics(config.metrics, render, tasks.token()).await?
        {
            tasks.spawn(served);
        }
        info!(node = %config.node_name, manifests = %config.manifest_dir.display(), "edge ready");
        Ok(Edge {
            node,
            tasks,
            _lock: lock,
        })
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
