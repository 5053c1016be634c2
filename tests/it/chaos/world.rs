//! A schedule's cluster: one head and its edges as real processes, each edge behind its own
//! relay; carries out the steps and records what each did, above all which applies were
//! acknowledged.

use super::check::{self, Expect};
use super::plan::{FOREIGN, ForeignKind, HandEdit, LinkFault, Side, Spec, Step, node_name};
use crate::harness::{Daemon, EdgeDirs, HeadProc, bin, edgenode, free_udp_addr};
use crate::relay::{Direction, Relay};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How long a healed schedule may take to converge.
pub const CONVERGE: Duration = Duration::from_secs(120);
/// How long one CLI command may take before the schedule fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// One edit (an `apply`, or a `delete`, which leaves no pods) and whether it was acknowledged.
#[derive(Debug)]
pub struct Applied {
    /// Where it ran.
    pub on: Side,
    /// Its step (None for the edits after healing).
    pub step: Option<usize>,
    /// What it set.
    pub specs: Vec<Spec>,
    /// Exited 0: the edit is durable and must not be lost.
    pub acked: bool,
}

/// An edge: its files, its relay to the head and its process while it runs.
pub struct EdgeProc {
    /// Its files.
    pub dirs: EdgeDirs,
    relay: Relay,
    daemon: Option<Daemon>,
    /// Its --drift-interval.
    drift: String,
    /// Indexes into [`FOREIGN`] of what was planted in its manifest directory.
    pub planted: Vec<usize>,
}

/// The processes and files of one schedule.
pub struct World {
    dir: tempfile::TempDir,
    head_addr: SocketAddr,
    head: Option<HeadProc>,
    /// The edges.
    pub edges: Vec<EdgeProc>,
    /// Every edit, in order.
    pub applies: Vec<Applied>,
    /// What each step did, one line per step.
    pub outcomes: Vec<String>,
}

impl World {
    /// Starts a head and `edges` edges (joined through their relays) on a healthy network.
    pub async fn start(drift_ms: &[u64]) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside(dir.path())).unwrap();
        std::fs::write(link_target(dir.path()), "outside").unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        let token = head.token();
        let mut procs = Vec::new();
        for (e, drift) in drift_ms.iter().enumerate() {
            let relay = Relay::start(head_addr).await.unwrap();
            let dirs = EdgeDirs::new(dir.path(), &node_name(e));
            let mut edge = EdgeProc {
                dirs,
                relay,
                daemon: None,
                drift: format!("{drift}ms"),
                planted: Vec::new(),
            };
            edge.start(e, Some(&token)).await;
            procs.push(edge);
        }
        World {
            dir,
            head_addr,
            head: Some(head),
            edges: procs,
            applies: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    /// Keeps the schedule's files (logs, state, manifests) after it ends; returns where.
    pub fn keep_files(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    /// The directory holding the targets of planted links.
    pub fn outside(&self) -> PathBuf {
        outside(self.dir.path())
    }

    /// What the planted link points to.
    pub fn link_target(&self) -> PathBuf {
        link_target(self.dir.path())
    }

    /// What edge `edge`'s planted dangling link points to (nothing may ever be created there).
    pub fn dangling_target(&self, edge: usize) -> PathBuf {
        self.outside().join(format!("nowhere-{edge}.json"))
    }

    /// The control socket of the daemon on `side`, if it runs.
    pub fn socket(&self, side: Side) -> Option<&Path> {
        let daemon = match side {
            Side::Head => self.head.as_ref().map(|h| &h.daemon),
            Side::Edge(e) => self.edges[e].daemon.as_ref(),
        };
        daemon.map(|d| d.socket.as_path())
    }

    /// Carries out step `i`, recording what it did; an error if something failed that
    /// must not (an edit on a daemon left running).
    pub async fn run(&mut self, i: usize, step: &Step) -> Result<(), String> {
        let outcome = match step {
            Step::KillHead => self.kill(Side::Head),
            Step::StartHead => self.start_daemon(Side::Head).await,
            Step::RestartHead => {
                self.kill(Side::Head);
                self.start_daemon(Side::Head).await
            }
            Step::KillEdge(e) => self.kill(Side::Edge(*e)),
            Step::StartEdge(e) => self.start_daemon(Side::Edge(*e)).await,
            Step::RestartEdge(e) => {
                self.kill(Side::Edge(*e));
                self.start_daemon(Side::Edge(*e)).await
            }
            Step::Apply {
                on,
                specs,
                kill_after_us,
            } => {
                let kill = kill_after_us.map(Duration::from_micros);
                self.apply(Some(i), *on, specs, kill).await?
            }
            Step::ApplyBoth {
                head,
                edge,
                on_edge,
            } => {
                let edge = (Side::Edge(*edge), on_edge.as_slice());
                self.apply_together(i, (Side::Head, head), edge).await?
            }
            Step::Delete {
                on,
                namespace,
                edge,
            } => self.delete(i, *on, namespace, *edge).await?,
            Step::Link(e, fault) => {
                let relay = &self.edges[*e].relay;
                match *fault {
                    LinkFault::Cut => relay.cut(),
                    LinkFault::CutToHead => relay.cut_one_way(Direction::ToUpstream),
                    LinkFault::CutToEdge => relay.cut_one_way(Direction::ToClient),
                    LinkFault::Heal => relay.clear(),
                    LinkFault::Degrade {
                        drop,
                        delay_ms,
                        jitter_ms,
                        duplicate,
                    } => {
                        relay.set_drop(drop);
                        relay.set_delay(Duration::from_millis(delay_ms));
                        relay.set_jitter(Duration::from_millis(jitter_ms));
                        relay.set_duplicate(duplicate);
                    }
                }
                "done".to_string()
            }
            Step::HandEdit {
                edge,
                namespace,
                pod,
                edit,
            } => {
                let dir = &self.edges[*edge].dirs.manifests;
                let file = format!("edgesync_{namespace}_{pod}.json");
                match pick_manifest(dir, &file, i) {
                    Some(file) => hand_edit(&dir.join(&file), edit, &file),
                    None => "no manifest there".to_string(),
                }
            }
            Step::Plant { edge, index } => {
                let (name, kind) = FOREIGN[*index];
                let path = self.edges[*edge].dirs.manifests.join(name);
                let planted = match kind {
                    ForeignKind::File(text) => std::fs::write(&path, text),
                    ForeignKind::Link => std::os::unix::fs::symlink(self.link_target(), &path),
                    ForeignKind::Dangling => {
                        std::os::unix::fs::symlink(self.dangling_target(*edge), &path)
                    }
                    ForeignKind::Dir => std::fs::create_dir(&path),
                };
                planted.map_err(|e| format!("planting {}: {e}", path.display()))?;
                self.edges[*edge].planted.push(*index);
                "planted".to_string()
            }
            Step::Pause(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                "done".to_string()
            }
            Step::Settle => {
                self.heal().await;
                let started = Instant::now();
                let acked = Expect::Acknowledged(&self.applies);
                check::wait_converged(self, &acked, CONVERGE).await?;
                format!("converged in {:.1}s", started.elapsed().as_secs_f64())
            }
        };
        self.outcomes.push(outcome);
        Ok(())
    }

    /// `edgesync apply -f -` of `specs` on `on`; with `kill`, the daemon serving it is
    /// SIGKILLed that long after the command, started and waiting for its input, gets it.
    /// Records the apply and says how it ended; an error if it was not acknowledged although
    /// nothing was killed.
    pub async fn apply(
        &mut self,
        step: Option<usize>,
        on: Side,
        specs: &[Spec],
        kill: Option<Duration>,
    ) -> Result<String, String> {
        let (child, input) = self.start_apply(on, specs).await?;
        if kill.is_some() {
            // The command reads its input before it connects: once it waits for the end of
            // it, the kill lands that long into the apply rather than into the command's start.
            waiting_for_input(child.id()).await;
        }
        drop(input);
        if let Some(after) = kill {
            tokio::time::sleep(after).await;
            self.kill(on);
        }
        let out = finish(child).await?;
        self.record(step, on, specs, out, kill.is_some())
    }

    /// Two applies at once, one on each side.
    pub async fn apply_together(
        &mut self,
        step: usize,
        (a, a_specs): (Side, &[Spec]),
        (b, b_specs): (Side, &[Spec]),
    ) -> Result<String, String> {
        let (a_child, a_input) = self.start_apply(a, a_specs).await?;
        let (b_child, b_input) = self.start_apply(b, b_specs).await?;
        waiting_for_input(a_child.id()).await;
        waiting_for_input(b_child.id()).await;
        drop((a_input, b_input));
        let (a_out, b_out) = tokio::join!(finish(a_child), finish(b_child));
        let a_said = self.record(Some(step), a, a_specs, a_out?, false)?;
        let b_said = self.record(Some(step), b, b_specs, b_out?, false)?;
        Ok(format!("{a:?} {a_said}; {b:?} {b_said}"))
    }

    /// Starts `edgesync apply -f -` of `specs` on `on` and writes its input, leaving the
    /// input open: the command waits until it is closed.
    async fn start_apply(
        &self,
        on: Side,
        specs: &[Spec],
    ) -> Result<(tokio::process::Child, tokio::process::ChildStdin), String> {
        let text: Vec<String> = specs
            .iter()
            .map(|s| {
                let pods: Vec<(&str, &str)> = s
                    .pods
                    .iter()
                    .map(|(p, i)| (p.as_str(), i.as_str()))
                    .collect();
                edgenode(&s.namespace, &node_name(s.edge), &pods)
            })
            .collect();
        let socket = self
            .socket(on)
            .ok_or_else(|| format!("apply on {on:?}, which is down"))?;
        let mut child = spawn_cli(&["apply", "-f", "-"], socket);
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(text.join("---\n").as_bytes())
            .await
            .unwrap();
        Ok((child, input))
    }

    /// Records how an apply of `specs` on `on` ended and says so; an error if it was not
    /// acknowledged although its daemon was not `killed`.
    fn record(
        &mut self,
        step: Option<usize>,
        on: Side,
        specs: &[Spec],
        out: Output,
        killed: bool,
    ) -> Result<String, String> {
        let acked = out.status.success();
        let said = match acked {
            true => String::from_utf8_lossy(&out.stdout).replace('\n', "; "),
            false => String::from_utf8_lossy(&out.stderr).replace('\n', " "),
        };
        if !acked && !killed {
            return Err(format!("apply on {on:?} failed ({}): {said}", out.status));
        }
        self.applies.push(Applied {
            on,
            step,
            specs: specs.to_vec(),
            acked,
        });
        Ok(match acked {
            true => format!("acknowledged: {}", said.trim_end_matches("; ")),
            false => format!("not acknowledged ({}): {}", out.status, said.trim()),
        })
    }

    /// `edgesync delete edgenode` on `on`; recorded (as an edit leaving no pods) unless there
    /// was nothing to delete there.
    async fn delete(
        &mut self,
        step: usize,
        on: Side,
        namespace: &str,
        edge: usize,
    ) -> Result<String, String> {
        let socket = self
            .socket(on)
            .ok_or_else(|| format!("delete on {on:?}, which is down"))?;
        let name = node_name(edge);
        let args = ["delete", "edgenode", &name, "-n", namespace];
        let out = cli(&args, socket).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return match stderr.contains("not found") {
                true => Ok("not found there".to_string()),
                false => Err(format!("delete on {on:?} failed: {}", stderr.trim())),
            };
        }
        self.applies.push(Applied {
            on,
            step: Some(step),
            specs: vec![Spec {
                namespace: namespace.to_string(),
                edge,
                pods: Default::default(),
            }],
            acked: true,
        });
        Ok("deleted".to_string())
    }

    /// Heals every link and starts every daemon that is down.
    pub async fn heal(&mut self) {
        for edge in &self.edges {
            edge.relay.clear();
        }
        if self.head.is_none() {
            self.start_daemon(Side::Head).await;
        }
        for e in 0..self.edges.len() {
            if self.edges[e].daemon.is_none() {
                self.start_daemon(Side::Edge(e)).await;
            }
        }
    }

    /// SIGKILLs the daemon on `side` (if it runs).
    fn kill(&mut self, side: Side) -> String {
        match side {
            Side::Head => {
                if let Some(head) = self.head.take() {
                    head.daemon.kill();
                }
            }
            Side::Edge(e) => {
                if let Some(daemon) = self.edges[e].daemon.take() {
                    daemon.kill();
                }
            }
        }
        "killed".to_string()
    }

    /// Starts the daemon on `side` (already joined) and waits until it answers.
    async fn start_daemon(&mut self, side: Side) -> String {
        match side {
            Side::Head => {
                let head = HeadProc::start(self.dir.path(), self.head_addr, &[]).await;
                self.head = Some(head);
            }
            Side::Edge(e) => self.edges[e].start(e, None).await,
        }
        "started".to_string()
    }
}

impl EdgeProc {
    /// Starts edge `e` (joining with `token` if given) and waits until it answers.
    async fn start(&mut self, e: usize, token: Option<&str>) {
        let head = [self.relay.local_addr()];
        let extra = ["--drift-interval", &self.drift];
        let daemon = self.dirs.spawn(&node_name(e), &head, token, &extra);
        self.daemon = Some(daemon.ready().await);
    }
}

fn outside(dir: &Path) -> PathBuf {
    dir.join("outside")
}

/// What the planted link points to.
fn link_target(dir: &Path) -> PathBuf {
    outside(dir).join("target.json")
}

/// `file` if a regular file of that name is in `dir`, else another of edgesync's manifests
/// there (the `i`th, round), if there is one.
fn pick_manifest(dir: &Path, file: &str, i: usize) -> Option<String> {
    let is_file = |name: &str| std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.is_file());
    if is_file(file) {
        return Some(file.to_string());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("edgesync_") && n.ends_with(".json"))
        .filter(|n| !FOREIGN.iter().any(|(foreign, _)| foreign == n) && is_file(n))
        .collect();
    names.sort();
    (!names.is_empty()).then(|| names.swap_remove(i % names.len()))
}

/// Edits the manifest `file` at `path` by hand; never creates one (a manifest removed
/// meanwhile stays removed).
fn hand_edit(path: &Path, edit: &HandEdit, file: &str) -> String {
    let overwrite = |text: &[u8]| {
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(text))
    };
    let done = match edit {
        HandEdit::Delete => std::fs::remove_file(path),
        HandEdit::Junk(text) => overwrite(text.as_bytes()),
        HandEdit::Image(image) => {
            let text = std::fs::read(path).unwrap_or_default();
            let mut manifest = serde_json::from_slice(&text).unwrap_or(serde_json::Value::Null);
            let Some(old) = manifest.pointer_mut("/spec/containers/0/image") else {
                return format!("{file} holds no image; left as it is");
            };
            *old = image.as_str().into();
            overwrite(&serde_json::to_vec_pretty(&manifest).unwrap())
        }
    };
    match done {
        Ok(()) => format!("edited {file}"),
        Err(e) => format!("gone meanwhile ({e})"),
    }
}

/// Waits until process `pid` waits reading a pipe, as the CLI does while it waits for its
/// input (at most a second: where the kernel does not say, the wait is a second).
async fn waiting_for_input(pid: Option<u32>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let wchan = format!("/proc/{}/wchan", pid.unwrap_or(0));
    while tokio::time::Instant::now() < deadline {
        match std::fs::read_to_string(&wchan) {
            Ok(waiting) if waiting.contains("pipe_read") => return,
            Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Starts the CLI against `socket` without waiting for it.
fn spawn_cli(args: &[&str], socket: &Path) -> tokio::process::Child {
    tokio::process::Command::new(bin())
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("EDGESYNC_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edgesync runs")
}

/// Waits for a CLI command to end; an error if it hangs.
async fn finish(child: tokio::process::Child) -> Result<Output, String> {
    match tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => Ok(out.expect("edgesync's output is read")),
        Err(_) => Err(format!("a CLI command hung for {CLI_TIMEOUT:?}")),
    }
}

/// Runs the CLI against `socket` to completion.
pub async fn cli(args: &[&str], socket: &Path) -> Result<Output, String> {
    finish(spawn_cli(args, socket)).await
}
