//! What the head and the edge share as running daemons: start-up errors and the set of
//! background tasks with their orderly shutdown.

use crate::control::ControlError;
use crate::node::NodeError;
use crate::store::StoreError;
use crate::transport::TransportError;
use crate::transport::tls::TlsError;
use std::future::Future;
use std::path::Path;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Errors starting or running a head or an edge.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration or state.
    #[error("{0}")]
    Config(String),
    /// A file or directory problem.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// A head refused to let this edge join.
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
    Control(#[from] ControlError),
    /// Kubernetes bridge.
    #[error(transparent)]
    Kube(#[from] crate::head::cluster::ClusterError),
}

/// A file error naming its path.
pub fn io_err(path: &Path, source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Background tasks of a daemon, stopped together.
#[derive(Default)]
pub struct Tasks {
    shutdown: CancellationToken,
    set: JoinSet<()>,
}

impl Tasks {
    /// A token that fires when the daemon stops.
    pub fn token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Runs `task` until it ends or the daemon stops.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.set.spawn(task);
    }

    /// Signals every task to stop and waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.set.join_next().await.is_some() {}
    }
}
