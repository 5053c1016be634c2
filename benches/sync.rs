//! `cargo bench --bench sync [-- --quick]`: the figures of BENCHMARKS.md, measured with the
//! built binary as the head (and as edges where a whole process is measured) and in-process
//! edges where many are needed, over loopback QUIC with SQLite on disk. Prints one JSON object
//! per figure, then a table.

use edgesync::config::EdgeConfig;
use edgesync::control::Client;
use edgesync::edge::Edge;
use hyper::Method;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/relay.rs"]
mod relay;

struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    target: f64,
    /// The figure meets its target when at most (true) or at least (false) the target.
    at_most: bool,
}

impl Figure {
    fn met(&self) -> bool {
        if self.at_most {
            self.value <= self.target
        } else {
            self.value >= self.target
        }
    }
}

/// The binary measured: the one cargo built for this bench, or the one
/// `EDGESYNC_BENCH_BIN` names (for example the shipped static one, from `cargo dist`).
fn edgesync_bin() -> std::path::PathBuf {
    std::env::var_os("EDGESYNC_BENCH_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_edgesync").into())
}

/// A head process with its files under `dir`.
struct HeadProcess {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl HeadProcess {
    async fn start(dir: &Path) -> HeadProcess {
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        HeadProcess::start_at(dir, addr).await
    }

    /// A head listening for QUIC on `addr`, with its files under `dir` (kept from an earlier
    /// head there).
    async fn start_at(dir: &Path, addr: SocketAddr) -> HeadProcess {
        let api = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // Warnings kept for a look after a run, from every head started here.
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("head.log"))
            .unwrap();
        let child = Command::new(edgesync_bin())
            .args(["head", "--name", "head", "--listen", &addr.to_string()])
            .args(["--api-listen", &api.to_string()])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("head.sock"))
            .env(
                "EDGESYNC_LOG",
                std::env::var("EDGESYNC_BENCH_HEAD_LOG").unwrap_or("warn".into()),
            )
            .stderr(log)
            .spawn()
            .unwrap();
        let head = HeadProcess {
            child,
            dir: dir.to_path_buf(),
            addr,
        };
        wait(Duration::from_secs(20), || {
            head.dir.join("state/join-token").exists()
        })
        .await;
        while Client::new(&head.socket())
            .request(Method::GET, "/healthz", None)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        head
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("head.sock")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/join-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Waits until no sync traffic has moved for a second (the edges' reports after a sync all
    /// in), for at most five minutes.
    async fn quiet(&self) {
        let traffic = || async {
            let (_, body) = Client::new(&self.socket())
                .request(Method::GET, "/metrics", None)
                .await
                .unwrap();
            String::from_utf8_lossy(&body)
                .lines()
                .filter(|l| l.starts_with("edgesync_wire_bytes_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = traffic().await;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = traffic().await;
            if now == last {
                return;
            }
            last = now;
        }
        eprintln!("the head was still busy after five minutes");
    }

    /// Applies EdgeNodes of `yaml` (one or more documents) as `edgesync apply` sends them.
    async fn apply(&self, yaml: String) {
        self.apply_wire(edgesync::input::for_the_wire(&yaml).unwrap())
            .await
    }

    /// Applies text already in the form `edgesync apply` sends ([`edgesync::input::for_the_wire`]).
    async fn apply_wire(&self, body: String) {
        let (status, body) = Client::new(&self.socket())
            .request(Method::POST, "/v1/apply", Some(body.into_bytes()))
            .await
            .unwrap();
        assert!(status.is_success(), "{}", String::from_utf8_lossy(&body));
    }
}

impl Drop for HeadProcess {
    /// Stops the head as an operator does (SIGTERM): it closes every connection and exits
    /// (and a profiler running it writes its profile). Killed if still there after 10 s.
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait(limit: Duration, done: impl FnMut() -> bool) {
    wait_every(limit, Duration::from_micros(200), done).await
}

/// Checks `done` every `every` until it holds; panics after `limit`.
async fn wait_every(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out");
        tokio::time::sleep(every).await;
    }
}

fn edgenode(namespace: &str, node: &str, pods: usize, image: &str) -> String {
    let mut text = format!(
        "---\napiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: {node}\n  namespace: {namespace}\nspec:\n  pods:\n"
    );
    for p in 0..pods {
        text.push_str(&format!(
            "    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: pod{p}\n      spec:\n        containers:\n          - name: main\n            image: {image}\n"
        ));
    }
    text
}

fn manifest_has(dir: &Path, namespace: &str, pod: &str, image: &str) -> bool {
    std::fs::read_to_string(dir.join(format!("edgesync_{namespace}_{pod}.json")))
        .is_ok_and(|t| t.contains(&format!("\"{image}\"")))
}

fn edge_config(dir: &Path, name: &str, head: SocketAddr, token: &str) -> EdgeConfig {
    EdgeConfig {
        drift_interval: Duration::from_secs(30),
        ..EdgeConfig::for_test(dir, name, head, Some(token.to_string()))
    }
}

/// Every UDP byte `relay` carried both ways.
fn relayed(relay: &relay::Relay) -> f64 {
    let stats = relay.stats();
    (stats.to_upstream_bytes + stats.to_client_bytes) as f64
}

fn rss_bytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// 1: spec change on the head → manifest written on a connected edge. The clock starts as
/// the change is sent to the head's API, as in the fan-out: the client's read of its YAML
/// (what `edgesync apply` does before it sends) is timed apart.
async fn latency(changes: usize) -> Vec<Figure> {
    let dir = tempfile::tempdir().unwrap();
    let head = HeadProcess::start(dir.path()).await;
    let edge = Edge::start(edge_config(
        &dir.path().join("edge"),
        "edge01",
        head.addr,
        &head.token(),
    ))
    .await
    .unwrap();
    let manifests = dir.path().join("edge/manifests");
    // Renames into the directory wake a thread of its own, which takes no CPU from the head
    // and the edge meanwhile (a poll every 50 µs took a tenth of a core), and is woken at once
    // (tokio's timer rounds sleeps up to a millisecond).
    let renames = std::sync::Arc::new(RenameWatch::new(&manifests));
    let mut samples = Vec::with_capacity(changes);
    let mut yaml = Duration::ZERO;
    for i in 0..=changes {
        let image = format!("nginx:{i}");
        let read = Instant::now();
        let body = edgesync::input::for_the_wire(&edgenode("default", "edge01", 1, &image));
        yaml += read.elapsed();
        let started = Instant::now();
        head.apply_wire(body.unwrap()).await;
        let (dir, renames) = (manifests.clone(), renames.clone());
        tokio::task::spawn_blocking(move || {
            while !manifest_has(&dir, "default", "pod0", &image) {
                renames.wait(Duration::from_secs(10));
            }
        })
        .await
        .unwrap();
        if i > 0 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    edge.shutdown().await;
    eprintln!(
        "latency: the client's YAML of each change read into JSON in {:.3} ms (before the clock)",
        yaml.as_secs_f64() * 1000.0 / (changes + 1) as f64
    );
    if std::env::var_os("EDGESYNC_BENCH_SERIES").is_some() {
        for (i, w) in samples.chunks(100).enumerate() {
            let mut w = w.to_vec();
            w.sort_by(f64::total_cmp);
            eprintln!(
                "latency: changes {}..: p50 {:.2} ms",
                i * 100,
                percentile(&w, 0.5)
            );
        }
    }
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    // The floor, on the same disk in the same run: what one durable write of a manifest
    // costs, which every change pays once.
    let floor = write_floor(&manifests, changes);
    vec![
        Figure {
            name: format!("change_to_manifest_p50_of_{changes}"),
            value: p50,
            unit: "ms",
            target: 3.0,
            at_most: true,
        },
        Figure {
            name: format!("change_to_manifest_p99_of_{changes}"),
            value: p99,
            unit: "ms",
            target: 10.0,
            at_most: true,
        },
        Figure {
            name: "durable_write_floor_p50".into(),
            value: floor.0,
            unit: "ms",
            target: f64::INFINITY,
            at_most: true,
        },
        Figure {
            name: "durable_write_floor_p99".into(),
            value: floor.1,
            unit: "ms",
            target: f64::INFINITY,
            at_most: true,
        },
        Figure {
            name: "change_to_manifest_p50_vs_floor".into(),
            value: p50 / floor.1,
            unit: "x",
            target: 5.0,
            at_most: true,
        },
        Figure {
            name: "change_to_manifest_p99_vs_floor".into(),
            value: p99 / floor.1,
            unit: "x",
            target: 10.0,
            at_most: true,
        },
    ]
}

/// p50 and p99 (ms) of `count` durable atomic writes of a manifest-sized file in `dir`: a
/// temp file written and fsynced, renamed over the file, the directory fsynced (what
/// edgesync does for each manifest).
fn write_floor(dir: &Path, count: usize) -> (f64, f64) {
    let content =
        std::fs::read(dir.join("edgesync_default_pod0.json")).unwrap_or_else(|_| vec![b'x'; 600]);
    let path = dir.join("floor.json");
    let mut samples: Vec<f64> = (0..count.max(100))
        .map(|_| {
            let started = Instant::now();
            edgesync::fsutil::write_atomic(&path, &content, 0o600).unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let _ = std::fs::remove_file(&path);
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// Most documents one `apply` may carry (README, Limits): larger sets go as several applies
/// sent at once, as from several clients.
const APPLY_DOCUMENTS: usize = 500;

/// `docs` (YAML, one EdgeNode each) as the bodies of applies of at most [`APPLY_DOCUMENTS`], in
/// the form `edgesync apply` sends (its YAML read into JSON, as kubectl does, on the client's
/// machine); and the seconds that reading took here.
fn applies(docs: &[String]) -> (Vec<String>, f64) {
    let started = Instant::now();
    let bodies = docs
        .chunks(APPLY_DOCUMENTS)
        .map(|chunk| edgesync::input::for_the_wire(&chunk.concat()).unwrap())
        .collect();
    (bodies, started.elapsed().as_secs_f64())
}

/// Sends applies already in the form `edgesync apply` sends (see [`applies`]), all at once.
async fn apply_all(head: &HeadProcess, bodies: Vec<String>) {
    let applies = bodies.into_iter().map(|body| head.apply_wire(body));
    futures_util::future::join_all(applies).await;
}

/// The loopback address edge `i` of a fleet dials from, so each looks like a host of its own
/// to the head (which bounds connection attempts per address).
fn fleet_address(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

/// Files renamed into one directory, watched with inotify.
struct RenameWatch(rustix::fd::OwnedFd);

impl RenameWatch {
    fn new(dir: &Path) -> RenameWatch {
        use rustix::fs::inotify::{CreateFlags, WatchFlags, add_watch, init};
        let inotify = init(CreateFlags::CLOEXEC).unwrap();
        add_watch(&inotify, dir, WatchFlags::MOVED_TO).unwrap();
        RenameWatch(inotify)
    }

    /// Blocks until a file is renamed into the directory (or was since the last wait); panics
    /// after `timeout`.
    fn wait(&self, timeout: Duration) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        use rustix::fs::inotify::Reader;
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        let timeout = Timespec::try_from(timeout).unwrap();
        assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 1, "timed out");
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        // At least one event is there: one read takes those that came.
        Reader::new(&self.0, &mut buf).next().unwrap();
    }
}

/// The manifest of pod0 of each of a range of edges, watched with inotify: an edge writes one
/// by renaming a new file into place, so waiting for thousands to change costs no polling.
/// Watch before the change is applied.
struct Deliveries {
    inotify: rustix::fd::OwnedFd,
    dirs: std::collections::HashMap<i32, PathBuf>,
}

impl Deliveries {
    const FILE: &str = "edgesync_default_pod0.json";

    fn watch(dir: &Path, edges: std::ops::Range<usize>) -> Deliveries {
        use rustix::fs::inotify::{CreateFlags, WatchFlags, add_watch, init};
        let inotify = init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
        let dirs = edges
            .map(|i| {
                let dir = dir.join(format!("e{i}/manifests"));
                (
                    add_watch(&inotify, &dir, WatchFlags::MOVED_TO).unwrap(),
                    dir,
                )
            })
            .collect();
        Deliveries { inotify, dirs }
    }

    /// Waits until every watched manifest has `image`; returns the seconds from `start` each
    /// took, sorted.
    async fn wait(mut self, image: &str, start: Instant) -> Vec<f64> {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut times = Vec::new();
        let mut look = |dirs: &mut std::collections::HashMap<i32, PathBuf>, wd: i32| {
            if dirs
                .get(&wd)
                .is_some_and(|dir| manifest_has(dir, "default", "pod0", image))
            {
                times.push(start.elapsed().as_secs_f64());
                dirs.remove(&wd);
            }
        };
        let mut all: Vec<i32> = self.dirs.keys().copied().collect();
        let mut buf = vec![std::mem::MaybeUninit::uninit(); 64 << 10];
        while !self.dirs.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "timed out: {} edges without {image}, such as {}",
                self.dirs.len(),
                self.dirs.values().next().unwrap().display()
            );
            for wd in all.drain(..) {
                look(&mut self.dirs, wd);
            }
            let mut reader = Reader::new(&self.inotify, &mut buf);
            loop {
                match reader.next() {
                    // Events were lost: look at all.
                    Ok(e) if e.events().contains(ReadFlags::QUEUE_OVERFLOW) => {
                        all.extend(self.dirs.keys())
                    }
                    Ok(e)
                        if e.file_name()
                            .is_some_and(|f| f.to_bytes() == Self::FILE.as_bytes()) =>
                    {
                        all.push(e.wd())
                    }
                    Ok(_) => {}
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(e) => panic!("inotify: {e}"),
                }
            }
            if all.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        times.sort_by(f64::total_cmp);
        times
    }
}

/// Raises this process's open-file limit to its hard limit: each in-process edge holds a
/// database (three files), a socket, a lock and its control socket.
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// Gives this process a futex hash for the threads of `edges` edges (each has a database
/// thread, and the blocking pool writes their manifests). Linux (6.16 on) sizes a process's own
/// futex hash by its CPUs, not its threads: 16 slots on these two vCPUs, so with a thousand
/// edges' threads waiting each wake-up walked a list of some hundred waiters (`futex_wake` was
/// 6 % of a host's thread). An `edgesync edge` process has a handful of threads, for which the
/// default is right. Older kernels have one global hash and refuse the call, which is fine.
fn size_futex_hash(edges: usize) {
    const PR_FUTEX_HASH: libc::c_int = 78;
    const PR_FUTEX_HASH_SET_SLOTS: libc::c_ulong = 1;
    let slots = (4 * 2 * edges).next_power_of_two() as libc::c_ulong;
    // SAFETY: prctl with integer arguments only; it reads and writes no memory of ours.
    let _ = unsafe { libc::prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, slots, 0, 0) };
}

/// Has this process (and the threads it starts) run as `SCHED_BATCH`, as the edge's systemd
/// unit runs `edgesync edge` (`CPUSchedulingPolicy=batch`): a thread woken does not preempt a
/// running one. Where the call is refused the host runs as before.
fn run_as_batch() {
    let unit = include_str!("../systemd/edgesync-edge.service");
    assert!(
        unit.lines()
            .any(|l| l.trim() == "CPUSchedulingPolicy=batch"),
        "the edge's unit no longer runs it as batch work: the fleet's hosts must run as it does"
    );
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which only reads it.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

/// Edges one process hosts, on its one thread: eight processes for 10,000 edges keep the two
/// cores busy while some wait on an `fsync`. Each edge holds six open files, well within the
/// hard limit of 20,000 these machines set (which root cannot raise here: no
/// CAP_SYS_RESOURCE).
const EDGES_PER_HOST: usize = 1250;

/// A process of this bench hosting every `hosts`-th edge of a fleet from edge `host` on (see
/// [`host_edges`]), driven by one-line commands.
struct EdgeHost {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl EdgeHost {
    fn spawn(
        host: usize,
        hosts: usize,
        edges: usize,
        head: SocketAddr,
        token: &str,
        dir: &Path,
    ) -> EdgeHost {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .arg("--host-edges")
            .args([host, hosts, edges].map(|n| n.to_string()))
            .arg(head.to_string())
            .arg(token)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("edges.log"))
                    .unwrap(),
            )
            .env(
                "EDGESYNC_LOG",
                std::env::var("EDGESYNC_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        use tokio::io::AsyncBufReadExt;
        let stdin = child.stdin.take().unwrap();
        let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        EdgeHost {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the host prints.
    async fn answer(&mut self) -> String {
        self.stdout
            .next_line()
            .await
            .unwrap()
            .expect("the edge host ended")
    }

    async fn ask(&mut self, command: &str) -> String {
        use tokio::io::AsyncWriteExt;
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        self.answer().await
    }

    fn cpu(&self) -> f64 {
        self.child.id().map_or(0.0, cpu_seconds)
    }
}

/// Asks every host `command` at once; their answers.
async fn ask_all(hosts: &mut [EdgeHost], command: &str) -> Vec<String> {
    futures_util::future::join_all(hosts.iter_mut().map(|h| h.ask(command))).await
}

/// Asks every host `command`; their answers as numbers, summed field by field.
async fn sum_all(hosts: &mut [EdgeHost], command: &str) -> Vec<f64> {
    let mut sums: Vec<f64> = Vec::new();
    for answer in ask_all(hosts, command).await {
        for (i, n) in answer.split_whitespace().enumerate() {
            let n: f64 = n.parse().unwrap();
            match sums.get_mut(i) {
                Some(sum) => *sum += n,
                None => sums.push(n),
            }
        }
    }
    sums
}

/// `sync --host-edges HOST HOSTS EDGES HEAD TOKEN DIR`: runs edges HOST, HOST + HOSTS, ... of a
/// fleet of EDGES in this process, on one thread and with the allocator tuned as the `edgesync
/// edge` binary runs its one edge, each in `DIR/e{i}` dialing from its own loopback address,
/// prints `ready` once all are up, then answers commands on stdin: `mark` (remember each
/// edge's document and bytes on the wire now), `since` (bytes to and from the head since the
/// mark, and the bytes of the changes either side received since), `stop`.
async fn host_edges(args: &[String]) {
    raise_file_limit();
    edgesync::runtime::tune_edge_allocator().unwrap();
    let [host, hosts, fleet, head, token, dir] = args else {
        panic!("usage: --host-edges HOST HOSTS EDGES HEAD TOKEN DIR");
    };
    let [host, hosts, fleet] = [host, hosts, fleet].map(|n| n.parse::<usize>().unwrap());
    let head: SocketAddr = head.parse().unwrap();
    let dir = Path::new(dir);
    let mine: Vec<usize> = (host..fleet).step_by(hosts).collect();
    size_futex_hash(mine.len());
    let mut edges = Vec::with_capacity(mine.len());
    for chunk in mine.chunks(50) {
        let starts = chunk.iter().map(|&i| {
            let config = EdgeConfig {
                source_address: Some(fleet_address(i)),
                ..edge_config(&dir.join(format!("e{i}")), &format!("edge{i}"), head, token)
            };
            Edge::start(config)
        });
        for edge in futures_util::future::join_all(starts).await {
            edges.push(edge.unwrap());
        }
    }
    println!("ready");
    let wire = |edges: &[Edge]| -> f64 {
        let traffic = |e: &Edge, direction: &str| {
            let labels = edgesync::metrics::TrafficLabels {
                role: "head".into(),
                direction: direction.into(),
            };
            e.node().metrics().bytes.get_or_create(&labels).get() as f64
        };
        edges
            .iter()
            .map(|e| traffic(e, "in") + traffic(e, "out"))
            .sum()
    };
    let key = |i: usize| format!("default/edge{}", mine[i]);
    let (mut heads, mut bytes) = (Vec::new(), 0.0);
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(command)) = lines.next_line().await {
        match command.as_str() {
            "mark" => {
                heads.clear();
                for (i, edge) in edges.iter().enumerate() {
                    heads.push(edge.node().docs().heads(&key(i)).await.unwrap_or_default());
                }
                bytes = wire(&edges);
                println!("ok");
            }
            "since" => {
                let mut needed = 0;
                for (i, edge) in edges.iter().enumerate() {
                    let entry = edge.node().docs().sync_doc(&key(i)).unwrap();
                    let mut entry = entry.lock().await;
                    let changes = entry.doc().get_changes(&heads[i]);
                    needed += changes.iter().map(|c| c.raw_bytes().len()).sum::<usize>();
                }
                println!("{} {needed}", wire(&edges) - bytes);
            }
            _ => break,
        }
    }
    futures_util::future::join_all(edges.into_iter().map(Edge::shutdown)).await;
    println!("ok");
}

/// 2: a fleet of `edges` connected edges on one head, one EdgeNode each, hosted
/// [`EDGES_PER_HOST`] to a process: the head's memory per edge and CPU while all are idle;
/// fan-out of one pod update to `first` EdgeNodes and then to all; a reconnect storm after the
/// head restarts, with a change for every edge pending.
async fn fleet(edges: usize, first: usize) -> Vec<Figure> {
    // Its logs (head.log, edges.log) are kept after a run, until the next.
    let path = &Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-fleet");
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path).unwrap();
    let head = HeadProcess::start(&path.join("head")).await;
    let token = head.token();
    let before = rss_bytes(head.child.id());
    let joined = Instant::now();
    // Edge i on host i % hosts: a fan-out to the first EdgeNodes reaches every host.
    let count = edges.div_ceil(EDGES_PER_HOST);
    let mut hosts: Vec<EdgeHost> = (0..count)
        .map(|host| EdgeHost::spawn(host, count, edges, head.addr, &token, path))
        .collect();
    for host in &mut hosts {
        assert_eq!(host.answer().await, "ready");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "fleet: {edges} edges joined in {:.1} s; head memory per edge, connected without EdgeNodes: {:.1} KiB",
        joined.elapsed().as_secs_f64(),
        (rss_bytes(head.child.id()) - before) / edges as f64 / 1024.0
    );
    // The applies' bodies are made before each clock starts: a client reads its YAML on its own
    // machine, not on the head's or the edges' cores this bench shares with them.
    let docs = |image: &str, count: usize| -> Vec<String> {
        let yaml: Vec<String> = (0..count)
            .map(|i| edgenode("default", &format!("edge{i}"), 1, image))
            .collect();
        let (bodies, seconds) = applies(&yaml);
        eprintln!("fleet: the client's YAML of {count} EdgeNodes read into JSON in {seconds:.2} s");
        bodies
    };
    let bodies = docs("nginx:1", edges);
    let watch = Deliveries::watch(path, 0..edges);
    let started = Instant::now();
    apply_all(&head, bodies).await;
    watch.wait("nginx:1", started).await;
    eprintln!(
        "fleet: first sync of all in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Idle: presence written, status reports in, nothing moving, and the documents saved away
    // (which a quick run does not wait for: its small fleet is far from the 10,000 edges the
    // memory target is for).
    head.quiet().await;
    let unloaded = 2 * edgesync::node::docs::UNLOAD_AFTER + Duration::from_secs(2);
    tokio::time::sleep(match edges > 1000 {
        true => unloaded,
        false => Duration::from_secs(2),
    })
    .await;
    let pid = head.child.id();
    // Two keep-alive intervals: edges that went idle together send their keep-alives in bursts.
    // EDGESYNC_BENCH_IDLE_SECONDS sets another window, for a profiler to attach meanwhile.
    let idle_window = std::env::var("EDGESYNC_BENCH_IDLE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(match edges > 1000 {
            true => 2 * edgesync::transport::KEEP_ALIVE,
            false => Duration::from_secs(10),
        });
    eprintln!("fleet: idle for {} s", idle_window.as_secs());
    let cpu0 = cpu_seconds(pid);
    tokio::time::sleep(idle_window).await;
    let idle_cpu = (cpu_seconds(pid) - cpu0) / idle_window.as_secs_f64() * 100.0;
    let per_edge = (rss_bytes(pid) - before) / edges as f64 / 1024.0;

    // Fan-out, to the first `first` EdgeNodes and then to all; the head's CPU per update
    // apart from the edges' own.
    let hosts_cpu = |hosts: &[EdgeHost]| hosts.iter().map(EdgeHost::cpu).sum::<f64>();
    let mut fan_out = Vec::new();
    for (count, image) in [(first, "nginx:2"), (edges, "nginx:3")] {
        let bodies = docs(image, count);
        let me = std::process::id();
        let cpu = (cpu_seconds(pid), hosts_cpu(&hosts), cpu_seconds(me));
        let watch = Deliveries::watch(path, 0..count);
        let started = Instant::now();
        apply_all(&head, bodies).await;
        let applied = started.elapsed().as_secs_f64();
        let times = watch.wait(image, started).await;
        let last = *times.last().unwrap();
        let head_cpu = cpu_seconds(pid) - cpu.0;
        eprintln!(
            "fleet: fan-out to {count}: {last:.2} s (applies answered by {applied:.2} s, half of the edges by {:.2} s, 90 % by {:.2} s, 99 % by {:.2} s); CPU meanwhile: head {head_cpu:.2} s, edges {:.2} s, this bench {:.2} s",
            percentile(&times, 0.5),
            percentile(&times, 0.9),
            percentile(&times, 0.99),
            hosts_cpu(&hosts) - cpu.1,
            cpu_seconds(me) - cpu.2
        );
        fan_out.push((count, last, head_cpu / count as f64 * 1e6));
    }

    // The storm: the head restarts (every edge drops at once), a change for every edge is
    // applied as soon as it is back, and every edge reconnects and receives it.
    ask_all(&mut hosts, "mark").await;
    let bodies = docs("nginx:4", edges);
    let watch = Deliveries::watch(path, 0..edges);
    let addr = head.addr;
    drop(head);
    let started = Instant::now();
    let head = HeadProcess::start_at(&path.join("head"), addr).await;
    eprintln!(
        "fleet: storm: the head answers again after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let pid = head.child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid) as u64, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let cpu = (cpu_seconds(pid), hosts_cpu(&hosts));
    apply_all(&head, bodies).await;
    let resynced = watch.wait("nginx:4", started).await;
    let mut bytes = sum_all(&mut hosts, "since").await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sum_all(&mut hosts, "since").await;
        if now == bytes {
            break;
        }
        bytes = now;
    }
    sampler.abort();
    let storm_cpu = cpu_seconds(pid) - cpu.0;
    let storm_edges_cpu = hosts_cpu(&hosts) - cpu.1;
    // What the missed changes need: every change either side did not have yet, as stored.
    let (wire, needed) = (bytes[0], bytes[1]);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed) as f64;
    eprintln!(
        "fleet: storm: {:.0} KiB on the wire for {:.0} KiB of changes; CPU: head {storm_cpu:.2} s, edges {storm_edges_cpu:.2} s; head peak RSS {:.0} MiB",
        wire / 1024.0,
        needed / 1024.0,
        peak / 1048576.0
    );
    futures_util::future::join_all(hosts.iter_mut().map(|h| h.ask("stop"))).await;
    drop(head);
    // The files of the edges and the head go; the logs stay for a look, until the next run.
    let _ = std::fs::rename(path.join("head/head.log"), path.join("head.log"));
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let mut figures = vec![
        Figure {
            name: format!("head_memory_per_edge_of_{edges}"),
            value: per_edge,
            unit: "KiB",
            target: 50.0,
            at_most: true,
        },
        Figure {
            name: format!("head_idle_cpu_{edges}_edges"),
            value: idle_cpu,
            unit: "% of a core",
            target: 2.0,
            at_most: true,
        },
    ];
    for (count, last, per_update) in fan_out {
        figures.push(Figure {
            name: format!("fan_out_{count}_edges_last_manifest"),
            value: last,
            unit: "s",
            target: count as f64 / 1000.0,
            at_most: true,
        });
        figures.push(Figure {
            name: format!("fan_out_{count}_head_cpu_per_update"),
            value: per_update,
            unit: "µs",
            target: f64::INFINITY,
            at_most: true,
        });
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        figures.push(Figure {
            name: format!("storm_{edges}_edges_resync_{name}"),
            value: percentile(&resynced, p),
            unit: "s",
            target: 60.0,
            at_most: true,
        });
    }
    figures.push(Figure {
        name: "storm_bytes_vs_missed_changes".into(),
        value: wire / needed,
        unit: "x",
        target: 2.0,
        at_most: true,
    });
    figures.push(Figure {
        name: "storm_head_peak_memory_per_edge".into(),
        value: (peak - before) / edges as f64 / 1024.0,
        unit: "KiB",
        target: f64::INFINITY,
        at_most: true,
    });
    figures
}

/// 3: bytes both ways when an edge comes back after 1% of its documents changed, and the
/// round trips until it has them. The edge reaches the head through a relay that counts every
/// UDP byte (QUIC's own included) and, for the reconnect, adds 50 ms each way: the time from
/// the session's start to the last changed manifest, over the round-trip time, is the number
/// of round trips the resync waits for.
async fn resync(docs: usize) -> Vec<Figure> {
    const ONE_WAY: Duration = Duration::from_millis(50);
    let dir = tempfile::tempdir().unwrap();
    let head = HeadProcess::start(dir.path()).await;
    let relay = relay::Relay::start(head.addr).await.unwrap();
    let wire = || relayed(&relay);
    let edge_dir = dir.path().join("edge");
    let config = edge_config(&edge_dir, "edge01", relay.local_addr(), &head.token());
    let manifests = edge_dir.join("manifests");
    let edge = Edge::start(config.clone()).await.unwrap();
    // In applies of a few hundred, as a file may hold at most 500 documents.
    for first in (0..docs).step_by(250) {
        let some: String = (first..docs.min(first + 250))
            .map(|d| edgenode(&format!("ns{d}"), "edge01", 1, "nginx:1"))
            .collect();
        head.apply(some).await;
    }
    wait(Duration::from_secs(120), || {
        (0..docs).all(|d| manifest_has(&manifests, &format!("ns{d}"), "pod0", "nginx:1"))
    })
    .await;
    quiet(wire).await;
    let full = wire();
    edge.shutdown().await;
    let changed = (docs / 100).max(1);
    let update: String = (0..changed)
        .map(|d| edgenode(&format!("ns{d}"), "edge01", 1, "nginx:2"))
        .collect();
    head.apply(update).await;
    quiet(wire).await;
    relay.set_latency(ONE_WAY);
    relay.reset_stats();
    let edge = Edge::start(config).await.unwrap();
    let every = Duration::from_millis(1);
    wait_every(Duration::from_secs(60), every, || {
        edge.node().peers().is_connected("head")
    })
    .await;
    let linked = Instant::now();
    wait_every(Duration::from_secs(60), every, || {
        (0..changed).all(|d| manifest_has(&manifests, &format!("ns{d}"), "pod0", "nginx:2"))
    })
    .await;
    let round_trips = linked.elapsed().as_secs_f64() / (2.0 * ONE_WAY.as_secs_f64());
    quiet(wire).await;
    let bytes = wire();
    edge.shutdown().await;
    vec![
        Figure {
            name: format!("resync_{docs}_docs_bytes_vs_full_copy"),
            value: 100.0 * bytes / full,
            unit: "%",
            target: 5.0,
            at_most: true,
        },
        Figure {
            name: "resync_round_trips".into(),
            value: round_trips,
            unit: "round trips",
            target: 2.0,
            at_most: true,
        },
    ]
}

/// Waits until the byte count `bytes` has stood still for half a second.
async fn quiet(bytes: impl Fn() -> f64) {
    let mut last = bytes();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = bytes();
        if now == last {
            return;
        }
        last = now;
    }
}

/// 4: an idle edge process with 10 EdgeNodes and 50 pods.
async fn idle(seconds: u64) -> Vec<Figure> {
    let dir = tempfile::tempdir().unwrap();
    let head = HeadProcess::start(dir.path()).await;
    // Every UDP byte between edge and head, QUIC's keep-alives included.
    let relay = relay::Relay::start(head.addr).await.unwrap();
    let wire = || relayed(&relay);
    let edge_dir = dir.path().join("edge");
    let mut edge = Command::new(edgesync_bin())
        .args([
            "edge",
            "--node-name",
            "edge01",
            "--head",
            &relay.local_addr().to_string(),
            "--token",
            &head.token(),
        ])
        .arg("--state-dir")
        .arg(edge_dir.join("state"))
        .arg("--manifest-dir")
        .arg(edge_dir.join("manifests"))
        .arg("--socket")
        .arg(edge_dir.join("edge.sock"))
        .env("EDGESYNC_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let all: String = (0..10)
        .map(|d| edgenode(&format!("ns{d}"), "edge01", 5, "nginx:1"))
        .collect();
    head.apply(all).await;
    let manifests = edge_dir.join("manifests");
    wait(Duration::from_secs(60), || {
        (0..10).all(|d| manifest_has(&manifests, &format!("ns{d}"), "pod4", "nginx:1"))
    })
    .await;
    quiet(wire).await;
    let pid = edge.id();
    let (cpu0, bytes0) = (cpu_seconds(pid), wire());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = (cpu_seconds(pid) - cpu0) / seconds as f64 * 100.0;
    let bytes = (wire() - bytes0) / seconds as f64;
    let rss = rss_bytes(pid) / 1e6;
    let _ = edge.kill();
    let _ = edge.wait();
    vec![
        Figure {
            name: "idle_edge_memory".into(),
            value: rss,
            unit: "MB",
            target: 15.0,
            at_most: true,
        },
        Figure {
            name: "idle_edge_cpu".into(),
            value: cpu,
            unit: "% of a core",
            target: 0.1,
            at_most: true,
        },
        Figure {
            name: "idle_wire".into(),
            value: bytes,
            unit: "bytes/s",
            target: 32.0,
            at_most: true,
        },
    ]
}

/// 5: EdgeNode updates per second the head applies to its documents and SQLite.
async fn ingest(updates: usize) -> Vec<Figure> {
    let dir = tempfile::tempdir().unwrap();
    let head = HeadProcess::start(dir.path()).await;
    // Several clients at once, each with its own 100 EdgeNodes, as changes reach a head from
    // several sources: one client alone measures its round trips, not the head.
    let (clients, docs) = (4, 100);
    let batch = |client: usize, round: usize| -> String {
        (0..docs)
            .map(|d| {
                let image = format!("nginx:{round}");
                edgenode(&format!("team{client}"), &format!("edge{d}"), 1, &image)
            })
            .collect()
    };
    for client in 0..clients {
        head.apply(batch(client, 0)).await;
    }
    let rounds = updates / docs / clients;
    // Made ready as the CLI makes them before the clock starts: the head's work is measured.
    let bodies: Vec<Vec<String>> = (0..clients)
        .map(|client| {
            (1..=rounds)
                .map(|round| edgesync::input::for_the_wire(&batch(client, round)).unwrap())
                .collect()
        })
        .collect();
    let started = Instant::now();
    let client = |bodies: Vec<String>| {
        let head = &head;
        async move {
            for body in bodies {
                head.apply_wire(body).await;
            }
        }
    };
    futures_util::future::join_all(bodies.into_iter().map(client)).await;
    let rate = (rounds * docs * clients) as f64 / started.elapsed().as_secs_f64();
    vec![Figure {
        name: "head_ingest".into(),
        value: rate,
        unit: "updates/s",
        target: 10_000.0,
        at_most: false,
    }]
}

/// 6: an edge with 100 pods in its cache and the head unreachable, from exec to every manifest.
async fn cold_start() -> Vec<Figure> {
    let dir = tempfile::tempdir().unwrap();
    let edge_dir = dir.path().join("edge");
    let manifests = edge_dir.join("manifests");
    let spawn = |head: &str, token: Option<&str>| {
        let mut command = Command::new(edgesync_bin());
        command
            .args(["edge", "--node-name", "edge01", "--head", head])
            .arg("--state-dir")
            .arg(edge_dir.join("state"))
            .arg("--manifest-dir")
            .arg(&manifests)
            .arg("--socket")
            .arg(edge_dir.join("edge.sock"))
            .env(
                "EDGESYNC_LOG",
                std::env::var("EDGESYNC_BENCH_HEAD_LOG").unwrap_or("warn".into()),
            )
            .stderr(Stdio::null());
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        command.spawn().unwrap()
    };
    let all_written =
        || (0..100).all(|p| manifest_has(&manifests, "default", &format!("pod{p}"), "nginx:1"));
    let head_addr = {
        let head = HeadProcess::start(&dir.path().join("head")).await;
        let mut edge = spawn(&head.addr.to_string(), Some(&head.token()));
        head.apply(edgenode("default", "edge01", 100, "nginx:1"))
            .await;
        wait(Duration::from_secs(60), all_written).await;
        let _ = edge.kill();
        let _ = edge.wait();
        head.addr.to_string()
    };
    std::fs::remove_dir_all(&manifests).unwrap();
    let started = Instant::now();
    let mut edge = spawn(&head_addr, None);
    wait(Duration::from_secs(30), all_written).await;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    let _ = edge.kill();
    let _ = edge.wait();
    vec![Figure {
        name: "cold_start_100_pods".into(),
        value: elapsed,
        unit: "ms",
        target: 300.0,
        at_most: true,
    }]
}

/// The allocator `edgesync` runs with, for the edges this bench runs (those of its fleet's
/// hosts tuned as an edge's, see [`host_edges`]; the in-process ones of the other parts not).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    // EDGESYNC_LOG=edgesync=debug shows what the in-process edges do; silent by default.
    edgesync::runtime::init_tracing(edgesync::cli::LogFormat::Text, None, "off");
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A host of edges runs them on one thread, as `edgesync edge` runs its one.
    let host = args.first().is_some_and(|a| a == "--host-edges");
    if host {
        run_as_batch();
    }
    let mut runtime = match host {
        true => tokio::runtime::Builder::new_current_thread(),
        false => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
    };
    let runtime = runtime.enable_all().build().unwrap();
    match host {
        true => runtime.block_on(host_edges(&args[1..])),
        false => runtime.block_on(bench(&args)),
    }
}

/// Runs the parts of the bench `args` name: `--quick`, and optionally the names of the parts
/// to run (all by default).
async fn bench(args: &[String]) {
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.contains(&name);
    let mut figures = Vec::new();
    let run = Instant::now();
    let mut phase = |name: &str, found: Vec<Figure>| {
        eprintln!("{name}: done at {:.1} s", run.elapsed().as_secs_f64());
        figures.extend(found);
    };
    if wanted("latency") {
        phase("latency", latency(if quick { 100 } else { 1000 }).await);
    }
    if wanted("fleet") {
        let (edges, first) = if quick { (200, 100) } else { (10_000, 1000) };
        // EDGESYNC_BENCH_EDGES=N: another fleet size (the first fan-out is to a tenth of it).
        let (edges, first) = match std::env::var("EDGESYNC_BENCH_EDGES").map(|n| n.parse::<usize>())
        {
            Ok(Ok(n)) => (n, (n / 10).max(1)),
            _ => (edges, first),
        };
        phase("fleet", fleet(edges, first).await);
    }
    if wanted("resync") {
        phase("resync", resync(if quick { 200 } else { 1000 }).await);
    }
    if wanted("idle") {
        phase("idle", idle(if quick { 5 } else { 30 }).await);
    }
    if wanted("ingest") {
        phase("ingest", ingest(if quick { 2000 } else { 40_000 }).await);
    }
    if wanted("cold-start") {
        phase("cold-start", cold_start().await);
    }
    for f in &figures {
        let line = json!({"name": f.name, "value": (f.value * 1000.0).round() / 1000.0, "unit": f.unit, "target": f.target, "met": f.met()});
        println!("{line}");
    }
    let width = figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
    println!(
        "\n{:<width$} {:>12} {:<12} {:>10}  met",
        "figure", "value", "unit", "target"
    );
    for f in &figures {
        let cmp = if f.at_most { "<=" } else { ">=" };
        println!(
            "{:<width$} {:>12.3} {:<12} {cmp}{:>8}  {}",
            f.name,
            f.value,
            f.unit,
            f.target,
            if f.met() { "yes" } else { "NO" }
        );
    }
}
