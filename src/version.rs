//! What this build is: its version, the commit it was built from and that commit's date, and
//! the wire protocol it speaks.

use serde::Serialize;

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit built from ("unknown" outside a git checkout).
pub const COMMIT: &str = env!("EDGESYNC_COMMIT");
/// That commit's date, RFC 3339 ("unknown" outside a git checkout).
pub const COMMIT_DATE: &str = env!("EDGESYNC_COMMIT_DATE");

/// The build, as `edgesync version -o json` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildInfo {
    /// Package version.
    pub version: &'static str,
    /// Commit.
    pub commit: &'static str,
    /// Commit date.
    pub build_date: &'static str,
    /// Version byte of the wire frames.
    pub wire_version: u8,
    /// ALPN of the QUIC connections.
    pub alpn: String,
}

/// The version a node tells its peers: the package version, with the commit as build
/// metadata when known (`0.1.0+dcb77c7`).
pub fn short() -> String {
    match COMMIT {
        "unknown" => VERSION.to_string(),
        commit => format!("{VERSION}+{}", &commit[..commit.len().min(7)]),
    }
}

/// This build.
pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: VERSION,
        commit: COMMIT,
        build_date: COMMIT_DATE,
        wire_version: crate::sync::wire::VERSION,
        alpn: crate::transport::tls::alpn_protocols()
            .iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
            .join(", "),
    }
}
