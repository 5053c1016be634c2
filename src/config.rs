//! Daemon configuration: flags and `EDGESYNC_*` variables (via clap) over the TOML config file
//! over defaults, validated into [`HeadConfig`] and [`EdgeConfig`]. Defaults suit tests.

pub mod dns;

use crate::cli::{DEFAULT_SOCKET, EdgeArgs, HeadArgs};
use crate::input;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long an acceptance of the Acceptable Use Policy lasts unless configured (about six
/// months).
pub const DEFAULT_AUP_VALIDITY: Duration = Duration::from_secs(183 * 24 * 3600);

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/edgesync";
/// Default QUIC address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default head API address.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:7444";
/// Where a head serves /metrics unless told.
pub const DEFAULT_HEAD_METRICS: &str = "127.0.0.1:7445";
/// Where an edge serves /metrics unless told (loopback, as node agents do).
pub const DEFAULT_EDGE_METRICS: &str = "127.0.0.1:7446";
/// Default kubelet static pod directory.
pub const DEFAULT_MANIFEST_DIR: &str = "/etc/kubernetes/manifests";

/// A configuration problem; shown as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    /// The file or flag at fault.
    pub source_name: String,
    /// What is wrong.
    pub message: String,
}

fn config_err(source_name: impl Into<String>, message: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        source_name: source_name.into(),
        message: message.to_string(),
    }
}

/// A validated head configuration.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    /// Name in certificates and status.
    pub name: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// QUIC address.
    pub listen: SocketAddr,
    /// Head API address.
    pub api_listen: SocketAddr,
    /// Where /metrics is served.
    pub metrics: MetricsListen,
    /// Control socket.
    pub socket: PathBuf,
    /// Kubeconfig for the CRD bridge.
    pub kubeconfig: Option<PathBuf>,
    /// Peer heads.
    pub peers: Vec<String>,
    /// Namespaces exempt from the baseline profile.
    pub privileged_namespaces: Vec<String>,
    /// Lifetime of certificates issued to edges.
    pub edge_cert_lifetime: Duration,
    /// Namespace of the CA Secret, writer Lease and head Service (with a cluster).
    pub cluster_namespace: String,
    /// Duration of the writer Lease.
    pub lease_duration: Duration,
    /// Service whose endpoints are the peer heads.
    pub head_service: String,
    /// Namespaces whose EdgeNodes the bridge keeps; empty for all.
    pub watch_namespaces: Vec<String>,
    /// Configured certificate and key for the HTTPS API.
    pub api_cert: Option<(PathBuf, PathBuf)>,
    /// Names in the CA-issued API certificate.
    pub api_hostnames: Vec<String>,
    /// Approve registrations at once.
    pub auto_approve: bool,
    /// How long an AUP acceptance lasts.
    pub aup_validity: Duration,
    /// API server URL for users' kubeconfigs.
    pub cluster_server: Option<String>,
    /// CA file for users' kubeconfigs.
    pub cluster_ca: Option<PathBuf>,
    /// Lifetime of users' tokens.
    pub kubeconfig_ttl: Duration,
    /// DNS records for edge workers.
    pub dns: dns::DnsConfig,
    /// The name the portal's pages show.
    pub portal_title: String,
    /// The operators' e-mail address on the portal's pages.
    pub portal_contact: Option<String>,
    /// How long a portal sign-in lasts.
    pub session_lifetime: Duration,
}

impl HeadConfig {
    /// A standalone head with everything under `dir` and ephemeral loopback ports (for tests).
    pub fn for_test(dir: &Path) -> HeadConfig {
        HeadConfig {
            name: "head".into(),
            state_dir: dir.join("state"),
            listen: "127.0.0.1:0".parse().expect("valid address"),
            api_listen: "127.0.0.1:0".parse().expect("valid address"),
            metrics: MetricsListen::None,
            socket: dir.join("head.sock"),
            kubeconfig: None,
            peers: Vec::new(),
            privileged_namespaces: Vec::new(),
            edge_cert_lifetime: crate::transport::tls::NODE_CERT_LIFETIME,
            cluster_namespace: DEFAULT_CLUSTER_NAMESPACE.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            head_service: DEFAULT_HEAD_SERVICE.into(),
            watch_namespaces: Vec::new(),
            api_cert: None,
            api_hostnames: Vec::new(),
            auto_approve: false,
            aup_validity: DEFAULT_AUP_VALIDITY,
            cluster_server: None,
            cluster_ca: None,
            kubeconfig_ttl: DEFAULT_KUBECONFIG_TTL,
            dns: dns::DnsSettings::default()
                .resolve()
                .expect("the default DNS settings are valid"),
            portal_title: DEFAULT_PORTAL_TITLE.into(),
            portal_contact: None,
            session_lifetime: DEFAULT_SESSION_LIFETIME,
        }
    }
}

use dns::ProviderConfig;

/// The portal's name when none is configured.
pub const DEFAULT_PORTAL_TITLE: &str = "edgesync";
/// How long a portal sign-in lasts unless configured.
pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// Namespace of the head's cluster objects when neither flag nor pod says otherwise.
pub const DEFAULT_CLUSTER_NAMESPACE: &str = "edgesync-system";
/// Default duration of the writer Lease.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default lifetime of the tokens in users' kubeconfigs.
pub const DEFAULT_KUBECONFIG_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default head Service.
pub const DEFAULT_HEAD_SERVICE: &str = "edgesync-head";

/// The config file holds an API key: say so if others may read it.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "holds the DNS provider's API key but others may read it; chmod 600 it"
        );
    }
}

/// The namespace this pod runs in, if it runs in one.
fn pod_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
        })
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
}

/// A validated edge configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Node name.
    pub node_name: String,
    /// Heads to dial.
    pub heads: Vec<String>,
    /// Join token, if given.
    pub token: Option<String>,
    /// File holding the join token, read only when a join is needed.
    pub token_file: Option<PathBuf>,
    /// Extra peers to dial.
    pub peers: Vec<String>,
    /// Static pod directory.
    pub manifest_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// Address to publish.
    pub advertise_address: Option<String>,
    /// Local address to dial the heads from (default: the one the route picks).
    pub source_address: Option<std::net::IpAddr>,
    /// Namespaces exempt from the baseline profile on this edge.
    pub privileged_namespaces: Vec<String>,
    /// How often manifests are checked for hand edits.
    pub drift_interval: Duration,
    /// Where /metrics is served.
    pub metrics: MetricsListen,
}

/// Where a daemon serves Prometheus /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Not at all (`none`).
    None,
    /// The default address: skipped with a warning if it is in use (several daemons on one
    /// host).
    Default(SocketAddr),
    /// An address given: failing to listen on it is an error.
    Given(SocketAddr),
}

impl MetricsListen {
    /// `--metrics-listen` (flag, else file), else `default`.
    fn resolve(given: Option<String>, default: &str) -> Result<MetricsListen, ConfigError> {
        match given.as_deref() {
            None => Ok(MetricsListen::Default(
                default.parse().expect("valid default"),
            )),
            Some("none") => Ok(MetricsListen::None),
            Some(text) => text.parse().map(MetricsListen::Given).map_err(|_| {
                config_err(
                    "--metrics-listen",
                    format!("{}: not ADDR:PORT or none", input::show(text)),
                )
            }),
        }
    }
}

impl EdgeConfig {
    /// An edge with everything under `dir` (for tests).
    pub fn for_test(
        dir: &Path,
        node_name: &str,
        head: SocketAddr,
        token: Option<String>,
    ) -> EdgeConfig {
        EdgeConfig {
            node_name: node_name.into(),
            heads: vec![head.to_string()],
            token,
            token_file: None,
            peers: Vec::new(),
            manifest_dir: dir.join("manifests"),
            state_dir: dir.join("state"),
            socket: dir.join("edge.sock"),
            advertise_address: None,
            source_address: None,
            privileged_namespaces: Vec::new(),
            drift_interval: Duration::from_millis(200),
            metrics: MetricsListen::None,
        }
    }
}

fn read_file<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| config_err(&name, e.to_string()))?;
    toml::from_str(&text).map_err(|e| config_err(&name, e.message().to_string()))
}

fn merge_list(flag: Vec<String>, file: Vec<String>) -> Vec<String> {
    if flag.is_empty() { file } else { flag }
}

fn check_namespaces(names: &[String]) -> Result<(), ConfigError> {
    for ns in names {
        input::check_label(ns).map_err(|r| config_err("privileged_namespaces", r))?;
    }
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| input::check_subdomain(h).is_ok())
        .unwrap_or_else(|| "head".into())
}

impl HeadArgs {
    /// Merges flags over the config file over defaults and validates.
    pub fn resolve(self) -> Result<HeadConfig, ConfigError> {
        let file: HeadArgs = read_file(self.config.as_deref())?;
        let name = self.name.or(file.name).unwrap_or_else(host_name);
        input::check_subdomain(&name).map_err(|r| config_err("--name", r))?;
        let privileged_namespaces =
            merge_list(self.privileged_namespace, file.privileged_namespace);
        check_namespaces(&privileged_namespaces)?;
        let edge_cert_lifetime = match self.edge_cert_lifetime.or(file.edge_cert_lifetime) {
            None => crate::transport::tls::NODE_CERT_LIFETIME,
            Some(text) => parse_duration("--edge-cert-lifetime", &text)?,
        };
        if edge_cert_lifetime < Duration::from_secs(3) {
            return Err(config_err("--edge-cert-lifetime", "must be at least 3s"));
        }
        let cluster_namespace = self
            .cluster_namespace
            .or(file.cluster_namespace)
            .or_else(pod_namespace)
            .unwrap_or_else(|| DEFAULT_CLUSTER_NAMESPACE.into());
        input::check_label(&cluster_namespace).map_err(|r| config_err("--cluster-namespace", r))?;
        let lease_duration = match self.lease_duration.or(file.lease_duration) {
            None => DEFAULT_LEASE_DURATION,
            Some(text) => parse_duration("--lease-duration", &text)?,
        };
        if lease_duration < Duration::from_secs(2) {
            return Err(config_err("--lease-duration", "must be at least 2s"));
        }
        let head_service = self
            .head_service
            .or(file.head_service)
            .unwrap_or_else(|| DEFAULT_HEAD_SERVICE.into());
        input::check_label(&head_service).map_err(|r| config_err("--head-service", r))?;
        let api_cert = match (
            self.api_cert.or(file.api_cert),
            self.api_key.or(file.api_key),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(config_err(
                    "--api-cert",
                    "needs --api-key, and the other way round",
                ));
            }
        };
        let api_hostnames = merge_list(self.api_hostname, file.api_hostname);
        for host in &api_hostnames {
            if host.parse::<std::net::IpAddr>().is_err() {
                input::check_subdomain(host).map_err(|r| config_err("--api-hostname", r))?;
            }
        }
        let aup_validity = match self.aup_validity.or(file.aup_validity) {
            None => DEFAULT_AUP_VALIDITY,
            Some(text) => parse_duration("--aup-validity", &text)?,
        };
        if aup_validity < Duration::from_secs(1) {
            return Err(config_err("--aup-validity", "must be at least 1s"));
        }
        let portal_title = self
            .portal_title
            .or(file.portal_title)
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|| DEFAULT_PORTAL_TITLE.into());
        if portal_title.is_empty()
            || portal_title.chars().count() > 80
            || portal_title.chars().any(char::is_control)
        {
            return Err(config_err(
                "--portal-title",
                "must be 1 to 80 characters, without control characters",
            ));
        }
        let portal_contact = self.portal_contact.or(file.portal_contact);
        if let Some(contact) = &portal_contact {
            input::check_email(contact).map_err(|_| {
                config_err(
                    "--portal-contact",
                    format!(
                        "{}: not an e-mail address like ops@example.org",
                        input::show(contact)
                    ),
                )
            })?;
        }
        let session_lifetime = match self.session_lifetime.or(file.session_lifetime) {
            None => DEFAULT_SESSION_LIFETIME,
            Some(text) => parse_duration("--session-lifetime", &text)?,
        };
        if !(Duration::from_secs(300)..=Duration::from_secs(7 * 24 * 3600))
            .contains(&session_lifetime)
        {
            return Err(config_err(
                "--session-lifetime",
                "must be between 5m and 7d",
            ));
        }
        let kubeconfig_ttl = match self.kubeconfig_ttl.or(file.kubeconfig_ttl) {
            None => DEFAULT_KUBECONFIG_TTL,
            Some(text) => parse_duration("--kubeconfig-ttl", &text)?,
        };
        if !(Duration::from_secs(600)..=Duration::from_secs(30 * 24 * 3600))
            .contains(&kubeconfig_ttl)
        {
            return Err(config_err(
                "--kubeconfig-ttl",
                "must be between 10m and 30d",
            ));
        }
        let cluster_server = self.cluster_server.or(file.cluster_server);
        if let Some(url) = &cluster_server
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(config_err("--cluster-server", "must be an http(s):// URL"));
        }
        let dns = file
            .dns
            .unwrap_or_default()
            .resolve()
            .map_err(|(key, reason)| config_err(&key, reason))?;
        if let (ProviderConfig::Namecheap { .. }, Some(path)) = (&dns.provider, &self.config) {
            warn_if_readable(path);
        }
        let watch_namespaces = merge_list(self.watch_namespace, file.watch_namespace);
        for ns in &watch_namespaces {
            input::check_label(ns).map_err(|r| config_err("--watch-namespace", r))?;
        }
        Ok(HeadConfig {
            name,
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            api_listen: self
                .api_listen
                .or(file.api_listen)
                .unwrap_or_else(|| DEFAULT_API_LISTEN.parse().expect("valid default")),
            metrics: MetricsListen::resolve(
                self.metrics_listen.or(file.metrics_listen),
                DEFAULT_HEAD_METRICS,
            )?,
            socket: self
                .socket
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            kubeconfig: self.kubeconfig.or(file.kubeconfig),
            peers: merge_list(self.peer, file.peer),
            privileged_namespaces,
            edge_cert_lifetime,
            cluster_namespace,
            lease_duration,
            head_service,
            watch_namespaces,
            api_cert,
            api_hostnames,
            auto_approve: self.auto_approve.or(file.auto_approve).unwrap_or(false),
            aup_validity,
            cluster_server,
            cluster_ca: self.cluster_ca.or(file.cluster_ca),
            kubeconfig_ttl,
            dns,
            portal_title,
            portal_contact,
            session_lifetime,
        })
    }
}

impl EdgeArgs {
    /// Merges flags over the config file over defaults and validates.
    pub fn resolve(self) -> Result<EdgeConfig, ConfigError> {
        let file: EdgeArgs = read_file(self.config.as_deref())?;
        let node_name = self.node_name.or(file.node_name).ok_or_else(|| {
            config_err("--node-name", "required (or node_name in the config file)")
        })?;
        input::check_subdomain(&node_name).map_err(|r| config_err("--node-name", r))?;
        let heads = merge_list(self.head, file.head);
        if heads.is_empty() {
            return Err(config_err("--head", "at least one HOST:PORT is required"));
        }
        for head in &heads {
            if head
                .rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
            {
                return Err(config_err("--head", format!("{head:?} is not HOST:PORT")));
            }
        }
        let token = self.token.or(file.token);
        if let Some(token) = &token {
            crate::transport::tls::JoinToken::parse(token)
                .map_err(|e| config_err("--token", e.to_string()))?;
        }
        let drift = self
            .drift_interval
            .or(file.drift_interval)
            .unwrap_or_else(|| "10s".into());
        let drift_interval = humantime::parse_duration(&drift)
            .map_err(|e| config_err("--drift-interval", format!("{drift:?}: {e}")))?;
        if drift_interval < Duration::from_millis(50) {
            return Err(config_err("--drift-interval", "must be at least 50ms"));
        }
        let privileged_namespaces =
            merge_list(self.privileged_namespace, file.privileged_namespace);
        check_namespaces(&privileged_namespaces)?;
        Ok(EdgeConfig {
            node_name,
            heads,
            token,
            token_file: self.token_file.or(file.token_file),
            peers: merge_list(self.peer, file.peer),
            manifest_dir: self
                .manifest_dir
                .or(file.manifest_dir)
                .unwrap_or_else(|| DEFAULT_MANIFEST_DIR.into()),
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            socket: self
                .socket
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            advertise_address: self
                .advertise_address
                .or(file.advertise_address)
                .map(|a| a.to_string()),
            source_address: self.source_address.or(file.source_address),
            privileged_namespaces,
            drift_interval,
            metrics: MetricsListen::resolve(
                self.metrics_listen.or(file.metrics_listen),
                DEFAULT_EDGE_METRICS,
            )?,
        })
    }
}

/// Parses a duration such as `24h`, `30m` or `7d`, naming `flag` on error.
pub fn parse_duration(flag: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| config_err(flag, format!("{text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_configs_parse() {
        let head: HeadArgs = toml::from_str(include_str!("../config/head.toml")).unwrap();
        assert!(head.resolve().is_ok());
        let edge: EdgeArgs = toml::from_str(include_str!("../config/edge.toml")).unwrap();
        let edge = EdgeArgs {
            token: None,
            ..edge
        }
        .resolve()
        .unwrap();
        assert_eq!(edge.node_name, "edge01");
    }

    #[test]
    fn portal_settings_are_checked() {
        let head = |args: HeadArgs| args.resolve();
        let ok = head(HeadArgs {
            portal_title: Some("  Edge Lab ".into()),
            portal_contact: Some("ops@example.org".into()),
            session_lifetime: Some("1h".into()),
            ..HeadArgs::default()
        })
        .unwrap();
        assert_eq!(ok.portal_title, "Edge Lab");
        assert_eq!(ok.session_lifetime, Duration::from_secs(3600));
        for (args, flag) in [
            (
                HeadArgs {
                    portal_contact: Some("not an address".into()),
                    ..HeadArgs::default()
                },
                "--portal-contact",
            ),
            (
                HeadArgs {
                    portal_title: Some(" ".into()),
                    ..HeadArgs::default()
                },
                "--portal-title",
            ),
            (
                HeadArgs {
                    session_lifetime: Some("30d".into()),
                    ..HeadArgs::default()
                },
                "--session-lifetime",
            ),
        ] {
            let err = head(args).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
        }
    }

    #[test]
    fn flags_win_over_the_file_and_bad_values_name_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(
            &file,
            "node_name = \"from-file\"\nhead = [\"h:7443\"]\ndrift_interval = \"2s\"\n",
        )
        .unwrap();
        let args = EdgeArgs {
            node_name: Some("from-flag".into()),
            config: Some(file.clone()),
            ..EdgeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.node_name, "from-flag");
        assert_eq!(config.heads, ["h:7443"]);
        assert_eq!(config.drift_interval, Duration::from_secs(2));
        std::fs::write(&file, "nodename = \"x\"\n").unwrap();
        let err = EdgeArgs {
            config: Some(file.clone()),
            ..EdgeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains("edge.toml") && err.to_string().contains("nodename"),
            "{err}"
        );
        let err = EdgeArgs {
            node_name: Some("Bad_Name".into()),
            head: vec!["h:1".into()],
            ..EdgeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().starts_with("--node-name:"), "{err}");
    }
}
