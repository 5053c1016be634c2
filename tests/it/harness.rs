//! Test harness: the built `edgesync` binary run as real head and edge processes on loopback,
//! the CLI as a user runs it, condition waits with timeouts, and a deadline for a whole test.

use serde_json::Value;
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a test body with an overall deadline.
pub async fn within<F: Future<Output = ()>>(secs: u64, body: F) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test exceeded its time limit");
}

/// How long a test waits for something that should happen at once.
pub const SOON: Duration = Duration::from_secs(10);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_edgesync")
}

/// Waits until `check` returns Some, polling; panics with `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_tcp_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free UDP port on 127.0.0.1 (bound and released).
pub fn free_udp_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Runs the CLI to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("EDGESYNC_SOCKET")
        .output()
        .expect("edgesync runs")
}

/// Runs the CLI with `input` on stdin.
pub fn cli_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("edgesync runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// stdout of a successful CLI run; panics with stderr otherwise.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "edgesync failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A daemon process, killed on drop; its stderr goes to a log file.
pub struct Daemon {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// Where it serves /metrics (a free port of its own unless ARGS chose).
    pub metrics: Option<SocketAddr>,
}

impl Daemon {
    /// Spawns `edgesync ARGS`, its stderr going to `log`, not waiting. A head or an edge serves
    /// its metrics on a free loopback port unless ARGS say where.
    pub fn spawn(mut args: Vec<String>, log: PathBuf, socket: PathBuf) -> Daemon {
        let daemon = matches!(args.first().map(String::as_str), Some("head" | "edge"));
        let mut metrics = None;
        if daemon && !args.iter().any(|a| a == "--metrics-listen") {
            let address = free_tcp_addr();
            args.extend(["--metrics-listen".into(), address.to_string()]);
            metrics = Some(address);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin())
            .args(&args)
            .env(
                "EDGESYNC_LOG",
                "debug,quinn=info,quinn_proto=info,rustls=info",
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("edgesync starts");
        Daemon {
            child: Some(child),
            metrics,
            log,
            socket,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the control socket answers. A daemon binds it before it is up (an edge
    /// before it joins) and answers once it is, so each try is bounded and awaited, never a
    /// blocking call: a task spawned last on this runtime thread (such as the relay an edge
    /// joins through) runs only once the thread awaits, and a blocked thread deadlocks it.
    pub async fn ready(self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = tokio::process::Command::new(bin())
                .args(["status", "-o", "json", "--socket"])
                .arg(&self.socket)
                .env_remove("EDGESYNC_SOCKET")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status();
            let answered = tokio::time::timeout(Duration::from_secs(2), status).await;
            if answered.is_ok_and(|s| s.is_ok_and(|s| s.success())) {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not become ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit on its own and returns its exit code.
    pub async fn exit_code(mut self, timeout: Duration) -> i32 {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "process did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the process with SIGTERM and waits for it.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Kills the process at once (as a crash or power cut would).
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs a CLI command against this daemon's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--socket", self.socket.to_str().unwrap()]);
        cli(&all)
    }

    /// Runs a CLI command against this daemon and parses its JSON output.
    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&ok(self.cli(args))).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("--- log of {}:\n{}", self.log.display(), self.log_text());
            }
        }
    }
}

/// A head process with its files under `dir`.
pub struct HeadProc {
    /// The process.
    pub daemon: Daemon,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its state dir.
    pub state: PathBuf,
    /// Its HTTPS API address.
    pub api: SocketAddr,
}

impl HeadProc {
    /// Starts a standalone head in `dir` on `addr` and waits until it is ready.
    pub async fn start(dir: &Path, addr: SocketAddr, extra: &[&str]) -> HeadProc {
        HeadProc::start_named(dir, "head-1", addr, extra).await
    }

    /// Starts head `name` in `dir` on `addr` and waits until it is ready.
    pub async fn start_named(dir: &Path, name: &str, addr: SocketAddr, extra: &[&str]) -> HeadProc {
        std::fs::create_dir_all(dir).unwrap();
        let state = dir.join("head-state");
        let socket = dir.join("head.sock");
        let api = free_tcp_addr();
        let mut args: Vec<String> = vec![
            "head".into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--api-listen".into(),
            api.to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--name".into(),
            name.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let daemon = Daemon::spawn(args, dir.join("head.log"), socket)
            .ready()
            .await;
        HeadProc {
            daemon,
            addr,
            state,
            api,
        }
    }

    /// The join token written at first start.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state.join("join-token"))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// A head in `dir`, and edge `edge01` joined to it with the head's token.
pub async fn head_and_edge(dir: &Path) -> (HeadProc, EdgeDirs, Daemon) {
    let head = HeadProc::start(dir, free_udp_addr(), &[]).await;
    let dirs = EdgeDirs::new(dir, "edge01");
    let edge = dirs
        .start("edge01", &[head.addr], Some(&head.token()))
        .await;
    (head, dirs, edge)
}

/// An edge process's files under `dir`.
#[derive(Clone)]
pub struct EdgeDirs {
    /// State dir.
    pub state: PathBuf,
    /// Manifest dir.
    pub manifests: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// Log file.
    pub log: PathBuf,
}

impl EdgeDirs {
    /// Paths for an edge under `dir`.
    pub fn new(dir: &Path, name: &str) -> EdgeDirs {
        EdgeDirs {
            state: dir.join(format!("{name}-state")),
            manifests: dir.join(format!("{name}-manifests")),
            socket: dir.join(format!("{name}.sock")),
            log: dir.join(format!("{name}.log")),
        }
    }

    /// Spawns `edgesync edge` for node `name` dialing `heads` (token optional), not waiting;
    /// drift is checked every 200ms unless `extra` says otherwise.
    pub fn spawn(
        &self,
        name: &str,
        heads: &[SocketAddr],
        token: Option<&str>,
        extra: &[&str],
    ) -> Daemon {
        let mut args: Vec<String> = vec![
            "edge".into(),
            "--node-name".into(),
            name.into(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--manifest-dir".into(),
            self.manifests.display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
        ];
        if !extra.contains(&"--drift-interval") {
            args.extend(["--drift-interval".into(), "200ms".into()]);
        }
        for head in heads {
            args.extend(["--head".into(), head.to_string()]);
        }
        if let Some(token) = token {
            args.extend(["--token".into(), token.into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Daemon::spawn(args, self.log.clone(), self.socket.clone())
    }

    /// Spawns and waits until ready.
    pub async fn start(&self, name: &str, heads: &[SocketAddr], token: Option<&str>) -> Daemon {
        self.spawn(name, heads, token, &[]).ready().await
    }

    /// A manifest's parsed content, if the file exists.
    pub fn manifest(&self, namespace: &str, pod: &str) -> Option<Value> {
        let text = std::fs::read_to_string(
            self.manifests
                .join(format!("edgesync_{namespace}_{pod}.json")),
        )
        .ok()?;
        serde_json::from_str(&text).ok()
    }

    /// File names in the manifest dir.
    pub fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.manifests)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The image of the first container of a manifest.
pub fn image(manifest: &Value) -> &str {
    manifest["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or("")
}

/// Writes a file into `dir` and returns its path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The example EdgeNode with the image replaced.
pub fn example(image: &str) -> String {
    include_str!("../../example/edge01.yaml").replace("image: nginx", &format!("image: {image}"))
}

/// An EdgeNode with the given pods (name, image), in `namespace`, for `node`.
pub fn edgenode(namespace: &str, node: &str, pods: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: {node}\n  namespace: {namespace}\nspec:\n  pods:\n"
    );
    for (name, image) in pods {
        text.push_str(&format!(
            "    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: {name}\n      spec:\n        containers:\n          - name: main\n            image: {image}\n"
        ));
    }
    text
}

/// Pod names in `get -o json` output.
pub fn pod_names(node: &Value) -> Vec<String> {
    node["spec"]["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /metrics` from `address` as curl asks it (the Prometheus text format).
pub async fn scrape(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: edgesync\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The version a node of this build says to its peers, from `edgesync version -o json`:
/// the package version, with the commit's first 7 characters as build metadata.
pub fn said_version() -> String {
    let info: Value = serde_json::from_slice(&cli(&["version", "-o", "json"]).stdout).unwrap();
    let version = info["version"].as_str().unwrap();
    match info["commit"].as_str().unwrap() {
        "unknown" => version.to_string(),
        commit => format!("{version}+{}", &commit[..7]),
    }
}
