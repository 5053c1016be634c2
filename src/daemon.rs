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
    /// The cluster (a head's Kubernetes API).
    #[error(transparent)]
    Cluster(Box<dyn std::error::Error + Send + Sync>),
}

/// A file error naming its path.
pub fn io_err(path: &Path, source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Name of the lock file in a state dir.
const LOCK_FILE: &str = "lock";

/// A daemon's hold on its state dir: one daemon per state dir, for as long as it runs (an
/// advisory lock the kernel drops when the process ends, however it ends).
pub struct StateLock {
    _file: std::fs::File,
}

/// Creates `dir` (mode 0700) if missing and locks it for `role`, before anything else in it is
/// read or written; another daemon that holds it is named in the error.
pub fn lock_state_dir(dir: &Path, role: &str) -> Result<StateLock, DaemonError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    crate::fsutil::ensure_dir(dir, 0o700).map_err(|source| io_err(dir, source))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|source| io_err(&path, source))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.take(64).read_to_string(&mut holder);
        let holder = holder.trim();
        let holder = if holder.is_empty() {
            "another process"
        } else {
            holder
        };
        return Err(DaemonError::Config(format!(
            "state dir {} is in use by another edgesync ({holder}); give each daemon its own --state-dir",
            dir.display()
        )));
    }
    let record = format!("{role}, pid {}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(record.as_bytes()))
        .map_err(|source| io_err(&path, source))?;
    Ok(StateLock { _file: file })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_holds_one_daemon_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let held = lock_state_dir(&state, "head").unwrap();
        let refused = lock_state_dir(&state, "edge").err().unwrap().to_string();
        assert!(
            refused.contains("is in use by another edgesync (head, pid "),
            "{refused}"
        );
        assert!(
            refused.contains(&std::process::id().to_string()),
            "{refused}"
        );
        drop(held);
        let _again = lock_state_dir(&state, "edge").unwrap();
    }
}
