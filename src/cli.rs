//! Command line: subcommands and flags (clap derive), no logic. Daemon flags are also read
//! from the config file (same names, `_` for `-`) and from `EDGESYNC_*` variables; flags win.

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/edgesync/edgesync.sock";

/// edgesync: EdgeNode pods replicated head ⇄ edge as Automerge documents over QUIC, run as
/// kubelet static pods that keep going while the edge is offline.
#[derive(Debug, Parser)]
#[command(name = "edgesync", version, propagate_version = true)]
pub struct Cli {
    /// Log format of the daemons.
    #[arg(long, global = true, env = "EDGESYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What the daemons log: a level (error, warn, info, debug, trace) or a filter such as
    /// `info,edgesync::sync=debug`. Default: EDGESYNC_LOG, else info.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = log_filter)]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A `--log-level` the log filter understands.
fn log_filter(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_string())
        .map_err(|e| e.to_string())
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a head node: CA, join tokens, documents for every edge.
    Head(Box<HeadArgs>),
    /// Run an edge node: sync its EdgeNodes and write them as static pod manifests.
    Edge(Box<EdgeArgs>),
    /// Manage join tokens (on a head).
    Token {
        /// Token action.
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Manage edge nodes (on a head).
    Node {
        /// Node action.
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Manage the people who use the head's API (on a head).
    User {
        /// User action.
        #[command(subcommand)]
        action: UserAction,
    },
    /// Manage the Acceptable Use Policy users accept (on a head).
    Aup {
        /// AUP action.
        #[command(subcommand)]
        action: AupAction,
    },
    /// Create or update EdgeNodes from a YAML or JSON file (several documents allowed).
    Apply(ApplyArgs),
    /// Show what `apply -f FILE` would change (exit 1 when it would change something).
    Diff(DiffArgs),
    /// Show EdgeNodes.
    Get(GetArgs),
    /// Delete an EdgeNode (its pods are removed from the edge).
    Delete(DeleteArgs),
    /// Show peers, documents, last sync and applied pods of the local node.
    Status(StatusArgs),
    /// Show one EdgeNode in detail: spec summary, pods, conditions with reasons.
    Describe(DescribeArgs),
    /// Show who did what to users and the AUP (on a standalone head), oldest first.
    Audit {
        /// Only what happened within this long (e.g. 24h, 7d).
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print a CustomResourceDefinition (YAML): EdgeNode by default, or the one of RESOURCE.
    Crd {
        /// edgenodes (the default), edges, users or acceptableusepolicies.
        #[arg(value_name = "RESOURCE", default_value = "edgenodes")]
        resource: String,
    },
    /// Run a head and an edge in this process on loopback with temporary state and show what
    /// happens to the example EdgeNode.
    Dev(DevArgs),
    /// Show the version, the commit and its date, and the wire protocol.
    Version(VersionArgs),
    /// Print a shell completion script: `source <(edgesync completion bash)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Flags of `edgesync version`.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = VersionOutput::Text)]
    pub output: VersionOutput,
}

/// `version -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionOutput {
    /// Human-readable.
    Text,
    /// JSON for scripts.
    Json,
    /// YAML.
    Yaml,
}

/// Flags of `edgesync head`.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadArgs {
    /// TOML config file (see config/head.toml).
    #[arg(long, env = "EDGESYNC_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// State directory (database, CA, join token). Default /var/lib/edgesync.
    #[arg(long, env = "EDGESYNC_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// QUIC address for edges and peer heads (UDP). Default 0.0.0.0:7443.
    #[arg(long, env = "EDGESYNC_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTPS API address (registration, AUP, kubeconfig). Default 0.0.0.0:7444.
    #[arg(long, env = "EDGESYNC_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Serve Prometheus /metrics over plain HTTP on ADDR:PORT (`none`: not at all). Default
    /// 127.0.0.1:7445; a default address already in use is skipped with a warning.
    #[arg(long, env = "EDGESYNC_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Control socket for the CLI. Default /run/edgesync/edgesync.sock.
    #[arg(long, env = "EDGESYNC_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Kubeconfig for the EdgeNode CRD bridge (without it the head runs standalone).
    #[arg(long, env = "EDGESYNC_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Another head to sync documents with (HOST:PORT); repeatable.
    #[arg(long = "peer", env = "EDGESYNC_PEER", value_delimiter = ',')]
    #[serde(alias = "peers")]
    pub peer: Vec<String>,
    /// This head's name in certificates and status. Default: the host name.
    #[arg(long, env = "EDGESYNC_NAME")]
    pub name: Option<String>,
    /// Namespace whose pods may break the Pod Security baseline profile; repeatable.
    #[arg(
        long = "privileged-namespace",
        env = "EDGESYNC_PRIVILEGED_NAMESPACES",
        value_delimiter = ','
    )]
    #[serde(alias = "privileged_namespaces")]
    pub privileged_namespace: Vec<String>,
    /// Lifetime of certificates issued to edges (e.g. 365d); edges renew after two thirds.
    #[arg(long, env = "EDGESYNC_EDGE_CERT_LIFETIME")]
    pub edge_cert_lifetime: Option<String>,
    /// With a cluster: namespace of the shared CA Secret, the writer Lease and the head
    /// Service. Default: the pod's namespace (POD_NAMESPACE or the service account's), else
    /// edgesync-system.
    #[arg(long, env = "EDGESYNC_CLUSTER_NAMESPACE")]
    pub cluster_namespace: Option<String>,
    /// Certificate chain (PEM) for the HTTPS API; default: one from the head's CA.
    #[arg(long, env = "EDGESYNC_API_CERT", requires = "api_key")]
    pub api_cert: Option<PathBuf>,
    /// Private key (PEM) of --api-cert.
    #[arg(long, env = "EDGESYNC_API_KEY", requires = "api_cert")]
    pub api_key: Option<PathBuf>,
    /// Host name or IP address the HTTPS API is reached by, put in the certificate the head's
    /// CA issues for it (repeatable). localhost, 127.0.0.1, ::1 and --name are always in.
    #[arg(
        long = "api-hostname",
        env = "EDGESYNC_API_HOSTNAMES",
        value_delimiter = ','
    )]
    #[serde(alias = "api_hostnames")]
    pub api_hostname: Vec<String>,
    /// Approve registrations at once (true), or let them wait for `edgesync user approve` (false,
    /// the default).
    #[arg(long, env = "EDGESYNC_AUTO_APPROVE")]
    pub auto_approve: Option<bool>,
    /// How long an acceptance of the Acceptable Use Policy lasts (e.g. 6months, 90d).
    #[arg(long, env = "EDGESYNC_AUP_VALIDITY")]
    pub aup_validity: Option<String>,
    /// API server URL written into users' kubeconfigs; default: the one the head uses.
    #[arg(long, env = "EDGESYNC_CLUSTER_SERVER")]
    pub cluster_server: Option<String>,
    /// CA certificate (PEM) of that API server for users' kubeconfigs; default: the head's.
    #[arg(long, env = "EDGESYNC_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// Lifetime of the tokens in users' kubeconfigs (10m to 30d; default 24h).
    #[arg(long, env = "EDGESYNC_KUBECONFIG_TTL")]
    pub kubeconfig_ttl: Option<String>,
    /// The name the user portal's pages show (default "edgesync").
    #[arg(long, env = "EDGESYNC_PORTAL_TITLE")]
    pub portal_title: Option<String>,
    /// The operators' e-mail address the portal's pages show for questions.
    #[arg(long, env = "EDGESYNC_PORTAL_CONTACT")]
    pub portal_contact: Option<String>,
    /// How long a portal sign-in lasts (5m to 7d; default 8h).
    #[arg(long, env = "EDGESYNC_SESSION_LIFETIME")]
    pub session_lifetime: Option<String>,
    /// `[dns]` of the config file: records for edge workers (config file only).
    #[arg(skip)]
    pub dns: Option<DnsSettings>,
    /// With a cluster: a namespace whose EdgeNodes the head keeps (repeatable); default all.
    #[arg(
        long = "watch-namespace",
        env = "EDGESYNC_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    #[serde(alias = "watch_namespaces")]
    pub watch_namespace: Vec<String>,
    /// With a cluster: how long the writer Lease lasts without renewal (e.g. 15s); another
    /// head takes over within about this long after the writer dies.
    #[arg(long, env = "EDGESYNC_LEASE_DURATION")]
    pub lease_duration: Option<String>,
    /// With a cluster: the head Service whose endpoints are the peer heads. Default
    /// edgesync-head.
    #[arg(long, env = "EDGESYNC_HEAD_SERVICE")]
    pub head_service: Option<String>,
}

/// Flags of `edgesync edge`.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeArgs {
    /// This edge's node name; it serves every EdgeNode of this name.
    #[arg(long, env = "EDGESYNC_NODE_NAME")]
    pub node_name: Option<String>,
    /// Head to sync with (HOST:PORT); repeatable, the first that answers is used.
    #[arg(long = "head", env = "EDGESYNC_HEAD", value_delimiter = ',')]
    #[serde(alias = "heads")]
    pub head: Vec<String>,
    /// Join token (needed only for the first start).
    #[arg(long, env = "EDGESYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "EDGESYNC_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Another peer to dial besides the heads (HOST:PORT); repeatable.
    #[arg(long = "peer", env = "EDGESYNC_PEER", value_delimiter = ',')]
    #[serde(alias = "peers")]
    pub peer: Vec<String>,
    /// Kubelet static pod directory. Default /etc/kubernetes/manifests.
    #[arg(long, env = "EDGESYNC_MANIFEST_DIR")]
    pub manifest_dir: Option<PathBuf>,
    /// State directory (database, certificate). Default /var/lib/edgesync.
    #[arg(long, env = "EDGESYNC_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket for the CLI. Default /run/edgesync/edgesync.sock.
    #[arg(long, env = "EDGESYNC_SOCKET")]
    pub socket: Option<PathBuf>,
    /// TOML config file (see config/edge.toml).
    #[arg(long, env = "EDGESYNC_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address the head should publish for this edge.
    #[arg(long, env = "EDGESYNC_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<std::net::IpAddr>,
    /// Local address to dial the heads from, on a host with several (default: the one the
    /// route to each head picks).
    #[arg(long, env = "EDGESYNC_SOURCE_ADDRESS")]
    pub source_address: Option<std::net::IpAddr>,
    /// Namespace whose pods may break the Pod Security baseline profile here; repeatable.
    #[arg(
        long = "privileged-namespace",
        env = "EDGESYNC_PRIVILEGED_NAMESPACES",
        value_delimiter = ','
    )]
    #[serde(alias = "privileged_namespaces")]
    pub privileged_namespace: Vec<String>,
    /// How often manifests are checked for hand edits (e.g. 10s, 500ms). Default 10s.
    #[arg(long, env = "EDGESYNC_DRIFT_INTERVAL")]
    pub drift_interval: Option<String>,
    /// Serve Prometheus /metrics over plain HTTP on ADDR:PORT (`none`: not at all). Default
    /// 127.0.0.1:7446; a default address already in use is skipped with a warning.
    #[arg(long, env = "EDGESYNC_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
}

/// `edgesync token` actions.
#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a join token and print it.
    Create {
        /// How long the token is valid (e.g. 24h, 30m, 7d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Print the whole `edgesync edge …` command an edge joins with, not only the token.
        #[arg(long)]
        print_join_command: bool,
        /// With --print-join-command: the head address edges dial (default: this head's).
        #[arg(long, requires = "print_join_command")]
        head: Option<String>,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// List the join tokens: id, expiry, age (never a secret).
    List {
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Delete a join token: no edge can join with it any more (edges that joined stay).
    Delete {
        /// The token's id (the third part of the token, as `token list` shows).
        id: String,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// `edgesync node` actions.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// List every registered edge, online or not (also `edgesync get nodes`).
    List {
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Output format: table, wide, name, json, yaml or jsonpath=TEMPLATE.
        #[arg(short = 'o', long, value_parser = get_output, default_value = "table")]
        output: GetOutput,
    },
    /// Show one registered edge in detail, with its EdgeNodes.
    Describe {
        /// Node name.
        name: String,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Forget an edge: its certificate is no longer accepted and its links drop; it may join
    /// again with a new token.
    Remove {
        /// Node name.
        name: String,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// `edgesync user ...`.
#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// List users with their status and AUP acceptance.
    List {
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Output format: table or json.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
    },
    /// Approve a registration (or a rejected or revoked user again).
    Approve(UserName),
    /// Reject a pending registration.
    Reject(UserName),
    /// Withdraw an approved user's access; their RoleBinding is removed at once.
    Revoke(UserName),
}

/// A user named on the command line.
#[derive(Debug, Args)]
pub struct UserName {
    /// Username.
    pub name: String,
    /// Control socket of the head.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `edgesync aup ...`.
#[derive(Debug, Subcommand)]
pub enum AupAction {
    /// Publish a new version of the policy from a text file; users must accept it again.
    Set {
        /// The policy text (`-` for standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        file: String,
        /// Control socket of the head.
        #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// Flags of `edgesync apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// EdgeNode file (YAML or JSON; `-` for standard input).
    #[arg(short = 'f', long = "filename", required = true)]
    pub file: PathBuf,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Change nothing: `client` checks the file here; `server` has the node check it and say
    /// what it would do.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "client")]
    pub dry_run: Option<DryRun>,
    /// Control socket.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `apply --dry-run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    /// Checked here, nothing sent.
    Client,
    /// Checked by the node, nothing stored.
    Server,
}

/// Flags of `edgesync describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Resource type: edgenode (also edgenodes, en), or node (a registered edge, on a head).
    pub resource: String,
    /// Its name.
    pub name: String,
    /// Namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Control socket.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Flags of `edgesync diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// EdgeNode file (YAML or JSON; `-` for standard input).
    #[arg(short = 'f', long = "filename", required = true)]
    pub file: PathBuf,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Control socket.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Output formats of `get`: `table`, `wide`, `name`, `json`, `yaml` or `jsonpath=TEMPLATE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetOutput {
    /// Columns like kubectl.
    Table,
    /// More columns.
    Wide,
    /// `resource/name`, one per line.
    Name,
    /// JSON as kubectl prints it.
    Json,
    /// YAML as kubectl prints it.
    Yaml,
    /// What a kubectl JSONPath template selects, such as `{.items[*].metadata.name}`.
    JsonPath(String),
}

/// Reads `-o`.
fn get_output(text: &str) -> Result<GetOutput, String> {
    Ok(match text {
        "table" => GetOutput::Table,
        "wide" => GetOutput::Wide,
        "name" => GetOutput::Name,
        "json" => GetOutput::Json,
        "yaml" => GetOutput::Yaml,
        _ => match text.strip_prefix("jsonpath=") {
            Some(template) => GetOutput::JsonPath(template.to_string()),
            None => {
                return Err("use table, wide, name, json, yaml or jsonpath=TEMPLATE".into());
            }
        },
    })
}

/// Flags of `edgesync get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Resource type: edgenodes (also edgenode, en), or nodes (the registered edges, on a
    /// head).
    pub resource: String,
    /// One EdgeNode by name.
    pub name: Option<String>,
    /// Output format: table, wide, name, json, yaml or jsonpath=TEMPLATE.
    #[arg(short = 'o', long, value_parser = get_output, default_value = "table")]
    pub output: GetOutput,
    /// Only EdgeNodes whose labels match this selector (`app=web,tier!=db,env in (a,b),!x`).
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// After the list, print each change as it happens, until interrupted.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// All namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Control socket.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Flags of `edgesync delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Resource type: edgenode (also edgenodes, en); none with -f.
    #[arg(required_unless_present = "file")]
    pub resource: Option<String>,
    /// EdgeNode name.
    #[arg(required_unless_present = "file")]
    pub name: Option<String>,
    /// Delete the EdgeNodes of this file (YAML or JSON; `-` for standard input).
    #[arg(short = 'f', long = "filename", conflicts_with_all = ["resource", "name"])]
    pub file: Option<PathBuf>,
    /// Namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Control socket.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Output formats of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusOutput {
    /// Human-readable.
    Table,
    /// JSON for scripts.
    Json,
}

/// Flags of `edgesync status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = StatusOutput::Table)]
    pub output: StatusOutput,
    /// Control socket.
    #[arg(long, env = "EDGESYNC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Flags of `edgesync dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Run the scripted demo, print the result and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

/// `[dns]` of head.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// `none` (default) or `namecheap`.
    pub provider: Option<String>,
    /// The zone records go in, e.g. `edge.example.org` (for Namecheap: the domain).
    pub zone: Option<String>,
    /// Record TTL in seconds (60 to 60000).
    pub ttl: Option<u32>,
    /// `[dns.namecheap]`.
    pub namecheap: Option<NamecheapSettings>,
}

/// `[dns.namecheap]` of head.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamecheapSettings {
    /// API endpoint (the sandbox is `https://api.sandbox.namecheap.com/xml.response`).
    pub api_url: Option<String>,
    /// ApiUser.
    pub api_user: Option<String>,
    /// ApiKey.
    pub api_key: Option<String>,
    /// UserName.
    pub username: Option<String>,
    /// ClientIp: this head's public IPv4 address, whitelisted at Namecheap.
    pub client_ip: Option<String>,
    /// The domain registered at Namecheap when the zone is below it (default: the zone).
    pub domain: Option<String>,
}
