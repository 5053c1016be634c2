//! Keeps the manifest directory equal to this node's documents. A change to a document's spec
//! reconciles that document only, and only if what it asks of this edge changed (status
//! changes, such as this edge's own reports, are not looked at); a periodic full pass catches
//! files changed by hand and documents that vanished.

use super::manifests::{self, Cause, Desired, Look};
use crate::crd::{POD_APPLIED, POD_NOT_WRITTEN, POD_REFUSED, PodState};
use crate::daemon::DaemonError;
use crate::input;
use crate::node::{AppliedPod, Change, Node};
use crate::store::OwnedFile;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::broadcast::error::TryRecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The reconciler of one edge.
pub struct Reconciler {
    node: Node,
    dir: PathBuf,
    /// Per document, a digest of what it asked for when last reconciled.
    done: HashMap<String, [u8; 32]>,
    /// Per document, what the last reconcile left.
    applied: BTreeMap<String, Vec<AppliedPod>>,
    /// Per document and file, why its pod is stuck, as last logged.
    warned: HashMap<(String, String), String>,
    /// The manifests this edge owns, by file, as the database has them: read by the first pass
    /// (and the first after a failure), then changed with each write to the database (this
    /// reconciler is its only writer).
    owned: Option<BTreeMap<String, OwnedFile>>,
    /// Per document, the generation reconciled and its pods' states, not reported yet.
    unreported: BTreeMap<String, Report>,
    /// Per document, what it asked for at the heads it was last read at, and what was last
    /// reported of it: a drift pass over a document that did not move reads it no more, and
    /// reports nothing unless a file's trouble changed what it would report.
    read: HashMap<String, Read>,
    /// Per owned file, the SHA-256 (hex) of what this reconciler last wrote into it: a change
    /// that asks for something else writes it without reading what is there first.
    written: HashMap<String, String>,
}

/// A document's generation reconciled and its pods' states.
type Report = (i64, Vec<PodState>);

/// What a document asked for when last read (see [`Reconciler::read`]).
struct Read {
    heads: Vec<automerge::ChangeHash>,
    wanted: Wanted,
    /// The report last stored in the document, if it was stored on these heads.
    reported: Option<Report>,
}

/// How long after a change's manifests are written the edge reports its pods' states (into
/// its document, stored and sent to the head): soon enough that the report goes out before
/// QUIC's acknowledgement of the change is due (25 ms after it came) and carries it, where
/// the acknowledgement was a datagram of its own. At most one report per [`REPORT_EVERY`].
const REPORT_AFTER: Duration = Duration::from_millis(10);

/// The least time between two reports: changes that come meanwhile are reported together.
/// Each report is a commit here and on the head; with changes back to back, a report for
/// each took a quarter of their time. An edge's report still reaches its head well within the
/// 200 ms a sync session holds a bare acknowledgement for it.
const REPORT_EVERY: Duration = Duration::from_millis(50);

/// What one document asks of this edge.
#[derive(Clone, Default)]
struct Wanted {
    generation: i64,
    desired: Vec<Desired>,
    refused_files: Vec<String>,
    pods: Vec<PodState>,
}

impl Wanted {
    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(self.generation.to_le_bytes());
        for d in &self.desired {
            for part in [d.file.as_bytes(), &d.content] {
                hash.update((part.len() as u64).to_le_bytes());
                hash.update(part);
            }
        }
        for p in &self.pods {
            let reason = p.reason.as_deref().unwrap_or("");
            for part in [&p.name, &p.state, reason] {
                hash.update((part.len() as u64).to_le_bytes());
                hash.update(part.as_bytes());
            }
        }
        hash.finalize().into()
    }
}

impl Reconciler {
    /// A reconciler writing into `dir`.
    pub fn new(node: Node, dir: PathBuf) -> Reconciler {
        Reconciler {
            node,
            dir,
            done: HashMap::new(),
            applied: BTreeMap::new(),
            warned: HashMap::new(),
            owned: None,
            unreported: BTreeMap::new(),
            read: HashMap::new(),
            written: HashMap::new(),
        }
    }

    /// Reconciles the documents that change, and all of them every `drift_interval`; reports
    /// what it did [`REPORT_AFTER`] later, at most once per [`REPORT_EVERY`].
    pub async fn run(mut self, drift_interval: Duration, shutdown: CancellationToken) {
        let mut changes = self.node.docs().subscribe();
        let mut tick = tokio::time::interval(drift_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut report_at = None;
        let mut reported_at = None;
        loop {
            let report = async {
                match report_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let only = tokio::select! {
                _ = shutdown.cancelled() => {
                    self.report().await;
                    return;
                }
                _ = report => {
                    self.report().await;
                    report_at = None;
                    reported_at = Some(tokio::time::Instant::now());
                    continue;
                }
                first = changes.recv() => {
                    let mut keys = BTreeSet::new();
                    let mut lagged = first.is_err();
                    let spec = |change: Change| change.moved.spec.then_some(change.key);
                    keys.extend(first.ok().and_then(spec));
                    loop {
                        match changes.try_recv() {
                            Ok(change) => keys.extend(spec(change)),
                            Err(TryRecvError::Lagged(_)) => lagged = true,
                            Err(_) => break,
                        }
                    }
                    if keys.is_empty() && !lagged {
                        continue;
                    }
                    (!lagged).then_some(keys)
                }
                _ = tick.tick() => None,
            };
            self.pass(only.as_ref()).await;
            if !self.unreported.is_empty() {
                report_at.get_or_insert_with(|| {
                    let soon = tokio::time::Instant::now() + REPORT_AFTER;
                    reported_at.map_or(soon, |at| soon.max(at + REPORT_EVERY))
                });
            }
        }
    }

    /// Reconciles the documents in `only` (if their wishes changed), or every document, and
    /// reports at once. A document that fails is tried again later and holds back no other.
    pub async fn run_once(&mut self, only: Option<&BTreeSet<String>>) {
        self.pass(only).await;
        self.report().await;
    }

    /// Reports the pods' states of the documents reconciled since the last report (all at
    /// once: the database commits them together).
    async fn report(&mut self) {
        let unreported = std::mem::take(&mut self.unreported);
        let docs = self.node.docs();
        let reports = unreported
            .iter()
            .map(|(key, (generation, pods))| async move {
                (key, docs.report_status(key, *generation, pods).await)
            });
        for (key, reported) in futures_util::future::join_all(reports).await {
            match reported {
                Ok(Some((before, after))) => {
                    // Only on the heads the document was read at: a change that came between
                    // the read and the report was not read yet.
                    if let Some(read) = self.read.get_mut(key)
                        && read.heads == before
                    {
                        read.heads = after;
                        read.reported = unreported.get(key).cloned();
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.node.metrics().reconcile_failures.inc();
                    warn!(doc = %key, error = %e, "cannot report this document's pods; will retry");
                    // The next pass reconciles it again, and so reports it.
                    self.done.remove(key);
                }
            }
        }
    }

    /// Reconciles, as [`Reconciler::run_once`], leaving the report for later.
    async fn pass(&mut self, only: Option<&BTreeSet<String>>) {
        self.node.metrics().reconcile_runs.inc();
        if let Err(e) = self.reconcile(only).await {
            self.node.metrics().reconcile_failures.inc();
            warn!(error = %e, "reconcile failed; will retry");
            // Whatever failed is done again by the next pass.
            self.done.clear();
            self.read.clear();
            self.written.clear();
            self.owned = None;
        }
        let count = |state: &str| {
            let pods = self.applied.values().flatten();
            pods.filter(|p| p.state == state).count() as i64
        };
        self.node.metrics().pods_refused.set(count(POD_REFUSED));
        self.node
            .metrics()
            .pods_not_written
            .set(count(POD_NOT_WRITTEN));
        self.node
            .set_applied(self.applied.values().flatten().cloned().collect());
    }

    async fn reconcile(&mut self, only: Option<&BTreeSet<String>>) -> Result<(), DaemonError> {
        let mine = |key: &String| crate::key::edge_of(key) == Some(self.node.name());
        let mut keys: BTreeSet<String> = match only {
            Some(changed) => changed.iter().filter(|k| mine(k)).cloned().collect(),
            None => self.node.docs().keys().into_iter().filter(mine).collect(),
        };
        if keys.is_empty() {
            return Ok(());
        }
        if only.is_none() {
            // With them the files of documents that are gone.
            keys.extend(self.owned().await?.values().map(|o| o.key.clone()));
        }
        for key in keys {
            if let Err(e) = self.reconcile_doc(&key, only.is_some()).await {
                self.node.metrics().reconcile_failures.inc();
                warn!(doc = %key, error = %e, "reconcile of this document failed; will retry");
                self.done.remove(&key);
                self.owned = None;
            }
        }
        Ok(())
    }

    /// The manifests this edge owns, by file.
    async fn owned(&mut self) -> Result<&BTreeMap<String, OwnedFile>, DaemonError> {
        let owned = match self.owned.take() {
            Some(owned) => owned,
            None => {
                let files = self.node.store().owned_files().await?;
                files.into_iter().map(|o| (o.file.clone(), o)).collect()
            }
        };
        Ok(self.owned.insert(owned))
    }

    /// The files document `key` owns.
    async fn owned_by(&mut self, key: &str) -> Result<Vec<OwnedFile>, DaemonError> {
        let owned = self.owned().await?.values();
        Ok(owned.filter(|o| o.key == key).cloned().collect())
    }

    /// Records that this edge owns `file`.
    async fn own(&mut self, file: OwnedFile) -> Result<(), DaemonError> {
        self.node.store().own_file(file.clone()).await?;
        if let Some(owned) = &mut self.owned {
            owned.insert(file.file.clone(), file);
        }
        Ok(())
    }

    /// Forgets that this edge owns `file`.
    async fn disown(&mut self, file: &str) -> Result<(), DaemonError> {
        self.node.store().disown_file(file.to_string()).await?;
        if let Some(owned) = &mut self.owned {
            owned.remove(file);
        }
        Ok(())
    }

    /// Reconciles document `key`; with `changed_only`, only if what it asks changed.
    async fn reconcile_doc(&mut self, key: &str, changed_only: bool) -> Result<(), DaemonError> {
        let wanted = self.wanted_at_heads(key).await?;
        let digest = wanted.as_ref().map(Wanted::digest);
        if changed_only && digest.is_some() && self.done.get(key) == digest.as_ref() {
            // Changed, but not in what it asks of this edge (its labels, say).
            return Ok(());
        }
        let owned = self.owned_by(key).await?;
        match (wanted, digest) {
            (Some(wanted), Some(digest)) => {
                self.apply(key, wanted, &owned).await?;
                self.done.insert(key.to_string(), digest);
            }
            _ => {
                self.write(key, &Wanted::default(), &owned).await?;
                self.done.remove(key);
                self.applied.remove(key);
                self.unreported.remove(key);
                self.read.remove(key);
            }
        }
        Ok(())
    }

    /// What document `key` asks for (see [`Reconciler::wanted`]), read again only if it moved
    /// since it was last read.
    async fn wanted_at_heads(&mut self, key: &str) -> Result<Option<Wanted>, DaemonError> {
        // The heads first: a change that comes after them makes the next look read again.
        let Some(heads) = self.node.docs().heads(key).await else {
            self.read.remove(key);
            return self.wanted(key).await;
        };
        if let Some(read) = self.read.get(key)
            && read.heads == heads
        {
            return Ok(Some(read.wanted.clone()));
        }
        let wanted = self.wanted(key).await?;
        match &wanted {
            Some(wanted) => {
                let read = Read {
                    heads,
                    wanted: wanted.clone(),
                    reported: None,
                };
                self.read.insert(key.to_string(), read)
            }
            None => self.read.remove(key),
        };
        Ok(wanted)
    }

    /// What document `key` asks for, or None if there is no such document. A deleted one asks for no pod, even if it still holds some (added on
    /// one side while the other deleted it: a delete removes only the pods it saw): no one
    /// sees that EdgeNode any more.
    async fn wanted(&self, key: &str) -> Result<Option<Wanted>, DaemonError> {
        #[cfg(test)]
        tests::READS.with(|n| n.set(n.get() + 1));
        let Some((mut view, _)) = self.node.docs().view(key).await? else {
            return Ok(None);
        };
        if view.deleted {
            view.pods.clear();
        }
        let privileged = view.privileged
            || self
                .node
                .rules()
                .privileged_namespaces
                .contains(&view.namespace);
        let mut wanted = Wanted {
            generation: view.generation,
            ..Wanted::default()
        };
        for (name, pod) in &view.pods {
            let checked =
                input::normalise_pod(pod, &view.name, privileged).and_then(|(pod_name, pod)| {
                    match pod_name == *name {
                        true => Ok(pod),
                        false => Err((
                            ".metadata.name".into(),
                            format!("{pod_name:?} differs from the pod's key {name:?}"),
                        )),
                    }
                });
            let (state, reason) = match checked {
                Ok(pod) => {
                    let desired = Desired::render(&view.namespace, &view.name, name, &pod);
                    wanted.desired.push(desired);
                    (POD_APPLIED, None)
                }
                Err((field, reason)) => {
                    let file = manifests::file_name(&view.namespace, name);
                    wanted.refused_files.push(file);
                    (
                        POD_REFUSED,
                        Some(format!("spec.pods[{name}]{field}: {reason}")),
                    )
                }
            };
            wanted.pods.push(PodState {
                name: name.clone(),
                state: state.into(),
                reason,
                ..PodState::default()
            });
        }
        Ok(Some(wanted))
    }

    /// Writes and removes the files of document `key`, and keeps its pods' states to report.
    async fn apply(
        &mut self,
        key: &str,
        mut wanted: Wanted,
        owned: &[OwnedFile],
    ) -> Result<(), DaemonError> {
        let stuck = self.write(key, &wanted, owned).await?;
        for s in &stuck {
            if let Some(p) = wanted.pods.iter_mut().find(|p| p.name == s.pod) {
                // A name no file can have is the spec's fault: refused, as by policy.
                (p.state, p.cause) = match s.cause {
                    Cause::InvalidFileName => (POD_REFUSED.into(), None),
                    cause => (POD_NOT_WRITTEN.into(), Some(cause.as_str().into())),
                };
                p.reason = Some(s.reason.clone());
            }
        }
        let report = (wanted.generation, wanted.pods.clone());
        let reported = self.read.get(key).and_then(|r| r.reported.as_ref());
        if reported != Some(&report) {
            self.unreported.insert(key.to_string(), report);
        }
        let parsed = crate::key::DocKey::parse(key).ok();
        let namespace = parsed.as_ref().and_then(|k| k.namespace()).unwrap_or("");
        let applied = wanted.pods.into_iter().map(|p| {
            let file = manifests::file_name(namespace, &p.name);
            // A pod refused after being applied, or whose new manifest could not be written,
            // keeps its previous manifest.
            let previous = owned.iter().any(|o| o.file == file);
            let written = match stuck.iter().find(|s| s.pod == p.name) {
                Some(s) => s.kept,
                None => p.state == POD_APPLIED || previous,
            };
            AppliedPod {
                edgenode: key.to_string(),
                pod: p.name,
                file: written.then_some(file),
                state: p.state,
                reason: p.reason,
            }
        });
        self.applied.insert(key.to_string(), applied.collect());
        Ok(())
    }

    /// Makes the files of document `key` (owning `owned`) what `wanted` asks. A file that
    /// cannot be written fails its pod alone: returns those pods, with the reasons.
    async fn write(
        &mut self,
        key: &str,
        wanted: &Wanted,
        owned: &[OwnedFile],
    ) -> Result<Vec<Stuck>, DaemonError> {
        let plan = manifests::plan(&wanted.desired, owned, &wanted.refused_files, |f| {
            let ours = owned.iter().any(|o| o.file == f);
            // What this edge last wrote there is not what is wanted now: it is written over,
            // whatever it holds.
            let stale = || {
                let want = wanted.desired.iter().find(|d| d.file == f);
                let last = self.written.get(f);
                last.zip(want)
                    .is_some_and(|(last, want)| *last != want.sha256())
            };
            let look = match ours {
                false => Look::Annotations,
                true if stale() => Look::Kind,
                true => Look::Content,
            };
            manifests::inspect(&self.dir, f, look)
        });
        let mut stuck: Vec<Stuck> = plan
            .blocked
            .into_iter()
            .map(|b| Stuck {
                pod: b.want.pod,
                file: b.want.file,
                cause: b.cause,
                reason: b.reason,
                kept: false,
            })
            .collect();
        for want in plan.write {
            let previous = owned.iter().any(|o| o.file == want.file);
            // A new file is recorded before it is written, so a crash never orphans it.
            let owned_as_is = owned
                .iter()
                .any(|o| o.file == want.file && o.key == want.key && o.pod == want.pod);
            if !owned_as_is {
                let record = OwnedFile {
                    file: want.file.clone(),
                    key: want.key.clone(),
                    pod: want.pod.clone(),
                };
                self.own(record).await?;
            }
            match manifests::write(&self.dir, &want).await {
                Ok(()) => {
                    info!(file = %want.file, doc = %want.key, "manifest written");
                    self.written.insert(want.file.clone(), want.sha256());
                }
                Err(e) => {
                    self.written.remove(&want.file);
                    if !previous {
                        self.disown(&want.file).await?;
                    }
                    stuck.push(Stuck {
                        cause: Cause::of(&e),
                        reason: format!("writing {} failed: {e}; edgesync tries again", want.file),
                        pod: want.pod,
                        file: want.file,
                        kept: previous,
                    });
                }
            }
        }
        for gone in &plan.remove {
            match manifests::remove(&self.dir, &gone.file) {
                Ok(removed) => {
                    if removed {
                        info!(file = %gone.file, doc = %key, "manifest removed");
                    }
                    self.written.remove(&gone.file);
                    self.disown(&gone.file).await?;
                }
                Err(e) => {
                    warn!(file = %gone.file, doc = %key, error = %e, "cannot remove this manifest; will retry")
                }
            }
        }
        for (replaced, why) in &plan.forget {
            warn!(file = %replaced.file, doc = %key, "{why}; edgesync forgets this manifest");
            self.written.remove(&replaced.file);
            self.disown(&replaced.file).await?;
        }
        // Each pod's trouble is logged when it starts or changes, not on every pass.
        self.warned
            .retain(|(doc, file), _| doc != key || stuck.iter().any(|s| &s.file == file));
        for s in &stuck {
            let seen = self
                .warned
                .insert((key.to_string(), s.file.clone()), s.reason.clone());
            if seen.as_ref() != Some(&s.reason) {
                warn!(doc = %key, pod = %s.pod, reason = %s.reason, "manifest not written");
            }
        }
        Ok(stuck)
    }
}

/// A pod whose manifest could not be written this pass.
struct Stuck {
    pod: String,
    file: String,
    cause: Cause,
    reason: String,
    /// Whether the manifest edgesync wrote before is still in place.
    kept: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{DesiredNode, Rules};
    use crate::node::Origin;
    use crate::store::Store;
    use crate::transport::tls::Role;
    use std::path::Path;

    thread_local! {
        /// Documents the reconciler read (a `#[tokio::test]` runs its tasks on its thread).
        pub(super) static READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    struct Edge {
        node: Node,
        reconciler: Reconciler,
        manifests: tempfile::TempDir,
        _state: tempfile::TempDir,
    }

    impl Edge {
        async fn new() -> Edge {
            let state = tempfile::tempdir().unwrap();
            let manifests = tempfile::tempdir().unwrap();
            let store = Store::open(state.path()).unwrap();
            let node = Node::open(Role::Edge, "edge01", store, Rules::new("default"))
                .await
                .unwrap();
            let reconciler = Reconciler::new(node.clone(), manifests.path().to_path_buf());
            Edge {
                node,
                reconciler,
                manifests,
                _state: state,
            }
        }

        fn dir(&self) -> &Path {
            self.manifests.path()
        }

        /// Writes the spec of EdgeNode `namespace/edge01` as given, unchecked (as an older head
        /// or a direct document edit might), then reconciles as a change notice would.
        async fn apply(&mut self, namespace: &str, pods: &[(&str, &str)]) {
            let desired = desired(namespace, pods);
            self.node.docs().apply_node(&desired).await.unwrap();
            let key = BTreeSet::from([desired.key().to_string()]);
            self.reconciler.run_once(Some(&key)).await;
        }

        /// A full pass, as the drift timer makes.
        async fn drift_pass(&mut self) {
            self.reconciler.run_once(None).await;
        }

        fn path(&self, namespace: &str, pod: &str) -> PathBuf {
            self.dir().join(manifests::file_name(namespace, pod))
        }

        fn image(&self, namespace: &str, pod: &str) -> Option<String> {
            let text = std::fs::read(self.path(namespace, pod)).ok()?;
            let manifest: serde_json::Value = serde_json::from_slice(&text).ok()?;
            manifest["spec"]["containers"][0]["image"]
                .as_str()
                .map(str::to_string)
        }

        /// The state and reason the edge reported for a pod, in the document's status.
        async fn reported(&self, namespace: &str, pod: &str) -> (String, String) {
            let key = format!("{namespace}/edge01");
            let (view, _) = self.node.docs().view(&key).await.unwrap().unwrap();
            let state = view.pod_states.iter().find(|p| p.name == pod).unwrap();
            (
                state.state.clone(),
                state.reason.clone().unwrap_or_default(),
            )
        }
    }

    /// EdgeNode `namespace/edge01` with `pods` (name and image).
    fn desired(namespace: &str, pods: &[(&str, &str)]) -> DesiredNode {
        DesiredNode {
            namespace: namespace.into(),
            name: "edge01".into(),
            labels: Default::default(),
            pods: pods
                .iter()
                .map(|(name, image)| {
                    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name},
                        "spec": {"containers": [{"name": "main", "image": image}]}});
                    (name.to_string(), pod)
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_change_writes_its_manifest_over_unread_and_a_drift_pass_still_finds_a_hand_edit() {
        within(async {
            let mut edge = Edge::new().await;
            let reads = || manifests::disk::tests::CONTENT_READS.with(std::cell::Cell::get);
            edge.apply("default", &[("web", "nginx:1")]).await;
            let before = reads();
            edge.apply("default", &[("web", "nginx:2")]).await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx:2"));
            assert_eq!(reads(), before, "what it wrote over was read first");

            // Unchanged, it is read: a hand edit is made right.
            std::fs::write(edge.path("default", "web"), b"{}").unwrap();
            edge.drift_pass().await;
            assert_eq!(reads(), before + 1);
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx:2"));

            // A reconciler that wrote nothing yet (a restart) reads before it writes.
            edge.reconciler = Reconciler::new(edge.node.clone(), edge.dir().to_path_buf());
            edge.apply("default", &[("web", "nginx:3")]).await;
            assert_eq!(reads(), before + 2);
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx:3"));
        })
        .await;
    }

    #[tokio::test]
    async fn changes_back_to_back_are_reported_together() {
        within(async {
            let edge = Edge::new().await;
            let node = edge.node.clone();
            let mut changes = node.docs().subscribe();
            let shutdown = CancellationToken::new();
            let hour = Duration::from_secs(3600);
            let running = tokio::spawn(edge.reconciler.run(hour, shutdown.clone()));
            let file = edge
                .manifests
                .path()
                .join(manifests::file_name("default", "web"));
            let started = std::time::Instant::now();
            for i in 0..10 {
                let image = format!("nginx:{i}");
                let spec = desired("default", &[("web", &image)]);
                node.docs().apply_node(&spec).await.unwrap();
                // Each written before the next comes.
                while !std::fs::read_to_string(&file).is_ok_and(|m| m.contains(&image)) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            // The last change is reported, without a change after it to bring the report.
            loop {
                let (view, _) = node.docs().view("default/edge01").await.unwrap().unwrap();
                if view.observed_generation == Some(view.generation) {
                    assert_eq!(view.pod_states[0].state, POD_APPLIED);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = started.elapsed();
            let mut reports = 0;
            while let Ok(change) = changes.try_recv() {
                reports += usize::from(change.origin == Origin::Local && change.moved.status);
            }
            // One report per REPORT_EVERY at most (ten changes within a few milliseconds: one
            // report or two, where each change's own report made ten).
            let most = elapsed.as_millis() / REPORT_EVERY.as_millis() + 1;
            assert!(reports as u128 <= most, "{reports} reports in {elapsed:?}");
            shutdown.cancel();
            running.await.unwrap();
        })
        .await;
    }

    async fn within<F: std::future::Future<Output = ()>>(body: F) {
        tokio::time::timeout(Duration::from_secs(30), body)
            .await
            .expect("test timed out");
    }

    #[tokio::test]
    async fn one_pod_that_cannot_be_written_holds_back_no_other_pod_nor_edgenode() {
        within(async {
            let mut edge = Edge::new().await;
            // A valid DNS-1123 name of 239 characters: its file name cannot exist.
            let long = format!("{0}.{0}.{0}.{0}", "a".repeat(59));
            std::fs::create_dir(edge.path("default", "stuck")).unwrap();
            // "default" is reconciled before "other": a failure in it must not stop "other".
            edge.apply("other", &[("web", "nginx")]).await;
            let pods = [
                ("stuck", "nginx"),
                (long.as_str(), "nginx"),
                ("web", "nginx"),
            ];
            edge.apply("default", &pods).await;
            edge.drift_pass().await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx"));
            assert_eq!(edge.image("other", "web").as_deref(), Some("nginx"));
            let (state, reason) = edge.reported("default", "stuck").await;
            assert_eq!(state, POD_NOT_WRITTEN);
            assert!(reason.contains("is a directory"), "{reason}");
            let (state, reason) = edge.reported("default", &long).await;
            assert_eq!(state, POD_REFUSED);
            assert!(reason.contains("more than the 255"), "{reason}");
            assert_eq!(edge.reported("default", "web").await.0, POD_APPLIED);

            // Later edits and drift repair go on around the stuck pods.
            let pods = [
                ("stuck", "nginx"),
                (long.as_str(), "nginx"),
                ("web", "nginx:2"),
            ];
            edge.apply("default", &pods).await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx:2"));
            std::fs::write(edge.path("other", "web"), "edited").unwrap();
            edge.drift_pass().await;
            assert_eq!(edge.image("other", "web").as_deref(), Some("nginx"));
            assert!(edge.path("default", "stuck").is_dir(), "left alone");

            // Once the directory is gone, the manifest is written.
            std::fs::remove_dir(edge.path("default", "stuck")).unwrap();
            edge.drift_pass().await;
            assert_eq!(edge.image("default", "stuck").as_deref(), Some("nginx"));
            assert_eq!(edge.reported("default", "stuck").await.0, POD_APPLIED);
        })
        .await;
    }

    #[tokio::test]
    async fn a_hand_edited_manifest_is_edgesyncs_whatever_comes_first() {
        within(async {
            let mut edge = Edge::new().await;
            edge.apply("default", &[("web", "nginx"), ("db", "redis")])
                .await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx"));

            // Edited by hand, then removed from the spec before any drift pass.
            std::fs::write(edge.path("default", "web"), "{\"hand\": \"edited\"}").unwrap();
            edge.apply("default", &[("db", "redis")]).await;
            assert!(!edge.path("default", "web").exists(), "removed");
            // Edited by hand, then changed in the spec before any drift pass.
            std::fs::write(edge.path("default", "db"), "{\"hand\": \"edited\"}").unwrap();
            edge.apply("default", &[("db", "redis:2")]).await;
            assert_eq!(edge.image("default", "db").as_deref(), Some("redis:2"));
            // Edited by hand with no apply: the drift pass repairs it.
            std::fs::write(edge.path("default", "db"), "not even JSON").unwrap();
            edge.drift_pass().await;
            assert_eq!(edge.image("default", "db").as_deref(), Some("redis:2"));
            // A pod that comes back is written again.
            edge.apply("default", &[("db", "redis:2"), ("web", "nginx")])
                .await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx"));
        })
        .await;
    }

    #[tokio::test]
    async fn a_drift_pass_reads_only_documents_that_moved_and_reports_only_news() {
        within(async {
            let mut edge = Edge::new().await;
            let key = "default/edge01";
            let reads = || READS.with(|n| n.get());
            edge.apply("default", &[("web", "nginx")]).await;
            let heads = edge.node.docs().heads(key).await.unwrap();
            let read = reads();
            edge.drift_pass().await;
            edge.drift_pass().await;
            assert_eq!(reads(), read, "the document did not move: not read again");
            let now = edge.node.docs().heads(key).await.unwrap();
            assert_eq!(now, heads, "nothing new to report");
            // A hand edit is still repaired; what the edge reports stays as it was.
            std::fs::write(edge.path("default", "web"), "not even JSON").unwrap();
            edge.drift_pass().await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx"));
            assert_eq!(edge.node.docs().heads(key).await.unwrap(), heads);
            // A change is read (once), and reported.
            edge.apply("default", &[("web", "nginx:2")]).await;
            edge.drift_pass().await;
            assert_eq!(reads(), read + 1);
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx:2"));
            let (view, _) = edge.node.docs().view(key).await.unwrap().unwrap();
            assert_eq!(view.observed_generation, Some(view.generation));
            // A report that changes is made again on a drift pass: here a pod whose file
            // became a directory cannot be written.
            let file = edge.path("default", "web");
            std::fs::remove_file(&file).unwrap();
            std::fs::create_dir(&file).unwrap();
            edge.drift_pass().await;
            assert_eq!(edge.reported("default", "web").await.0, POD_NOT_WRITTEN);
            std::fs::remove_dir(&file).unwrap();
            edge.drift_pass().await;
            assert_eq!(edge.reported("default", "web").await.0, POD_APPLIED);
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx:2"));
        })
        .await;
    }

    #[tokio::test]
    async fn links_in_the_manifest_dir_are_never_followed_nor_replaced() {
        within(async {
            let mut edge = Edge::new().await;
            let outside = tempfile::tempdir().unwrap();
            let dangling_target = outside.path().join("dangling-target.json");
            let target = outside.path().join("target.json");
            std::fs::write(&target, "outside").unwrap();
            std::os::unix::fs::symlink(&dangling_target, edge.path("default", "dangling")).unwrap();
            let pods = [("dangling", "nginx"), ("web", "nginx")];
            edge.apply("default", &pods).await;
            edge.drift_pass().await;
            assert_eq!(edge.image("default", "web").as_deref(), Some("nginx"));
            let (state, reason) = edge.reported("default", "dangling").await;
            assert_eq!(state, POD_NOT_WRITTEN);
            assert!(reason.contains("symbolic link"), "{reason}");

            // A managed manifest replaced by a link to a file outside.
            std::fs::remove_file(edge.path("default", "web")).unwrap();
            std::os::unix::fs::symlink(&target, edge.path("default", "web")).unwrap();
            edge.drift_pass().await;
            edge.apply("default", &[("dangling", "nginx"), ("web", "nginx:2")])
                .await;
            edge.apply("default", &[]).await;
            edge.drift_pass().await;

            for pod in ["dangling", "web"] {
                assert!(edge.path("default", pod).is_symlink(), "{pod} link kept");
            }
            assert!(
                !dangling_target.exists(),
                "nothing written through the link"
            );
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "outside");
            assert!(edge.node.store().owned_files().await.unwrap().is_empty());
        })
        .await;
    }
}
