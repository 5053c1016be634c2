//! Process runtime: tracing set-up, termination signals, and systemd readiness.

use crate::cli::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber: `--log-level`, else `EDGESYNC_LOG` (or `RUST_LOG`),
/// filters, default `default`; logs go to stderr, as text or JSON lines.
pub fn init_tracing(format: LogFormat, level: Option<&str>, default: &str) {
    let filter = level
        .map(str::to_string)
        .or_else(|| std::env::var("EDGESYNC_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Resolves on SIGINT or SIGTERM.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Tells systemd (Type=notify) that the service is ready; a no-op outside systemd.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Tells systemd what the service is waiting for (`systemctl status` shows it), and gives
/// its start another `wait` before it may time out: a start that waits for a head to answer
/// waits as long as it takes. A no-op outside systemd.
pub fn notify_waiting(status: &str, wait: std::time::Duration) {
    let usec = u32::try_from(wait.as_micros()).unwrap_or(u32::MAX);
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Status(status),
        sd_notify::NotifyState::ExtendTimeoutUsec(usec),
    ]);
}

/// Tells systemd (and `systemctl status`) what the service is doing now.
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Makes every file and socket the daemon creates private by default (umask 077): the
/// database, its WAL and the control socket never exist with wider permissions, not even for
/// a moment. Files meant to be shared get explicit modes.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Has jemalloc (when it is the global allocator) return an edge's freed pages as they come
/// free (see the `edgesync` binary's `tune_allocator`).
pub fn tune_edge_allocator() -> Result<(), tikv_jemalloc_ctl::Error> {
    use tikv_jemalloc_ctl::{Access, AsName};
    ["arenas.dirty_decay_ms\0", "arena.0.dirty_decay_ms\0"]
        .iter()
        .try_for_each(|key| key.name().write(0isize))
}
