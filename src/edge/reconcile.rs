//! Keeps the manifest directory equal to this node's documents. A change to a document
//! reconciles that document only, and only if what it asks for changed (the edge's own status
//! report is a change too, and needs no work); a periodic full pass catches files changed
//! by hand and documents that vanished.

use super::manifests::{self, Desired};
use crate::crd::{POD_APPLIED, POD_REFUSED, PodState};
use crate::daemon::{DaemonError, io_err};
use crate::fsutil;
use crate::input;
use crate::node::{AppliedPod, Node};
use crate::store::OwnedFile;
use automerge::ChangeHash;
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
    /// Per document, what it asked for when last reconciled.
    done: HashMap<String, Done>,
    /// Per document, what the last reconcile left.
    applied: BTreeMap<String, Vec<AppliedPod>>,
}

/// A document as last reconciled.
struct Done {
    /// Its heads then, after this edge's own status report: while they stay the same, the
    /// document need not be read again.
    heads: Vec<ChangeHash>,
    /// Digest of what it asked for.
    digest: [u8; 32],
    wanted: Wanted,
}

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
        }
    }

    /// Reconciles the documents that change, and all of them every `drift_interval`.
    pub async fn run(mut self, drift_interval: Duration, shutdown: CancellationToken) {
        let mut changes = self.node.subscribe();
        let mut tick = tokio::time::interval(drift_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            let only = tokio::select! {
                _ = shutdown.cancelled() => return,
                first = changes.recv() => {
                    let mut keys = BTreeSet::new();
                    let mut lagged = first.is_err();
                    keys.extend(first.ok());
                    loop {
                        match changes.try_recv() {
                            Ok(key) => {
                                keys.insert(key);
                            }
                            Err(TryRecvError::Lagged(_)) => lagged = true,
                            Err(_) => break,
                        }
                    }
                    (!lagged).then_some(keys)
                }
                _ = tick.tick() => None,
            };
            self.run_once(only.as_ref()).await;
        }
    }

    /// Reconciles the documents in `only` (if their wishes changed), or every document.
    pub async fn run_once(&mut self, only: Option<&BTreeSet<String>>) {
        self.node.metrics().reconcile_runs.inc();
        if let Err(e) = self.reconcile(only).await {
            self.node.metrics().reconcile_failures.inc();
            warn!(error = %e, "reconcile failed; will retry");
            // Whatever failed is done again by the next pass.
            self.done.clear();
        }
        let refused = self
            .applied
            .values()
            .flatten()
            .filter(|p| p.state == POD_REFUSED)
            .count();
        self.node.metrics().pods_refused.set(refused as i64);
        self.node
            .set_applied(self.applied.values().flatten().cloned().collect());
    }

    async fn reconcile(&mut self, only: Option<&BTreeSet<String>>) -> Result<(), DaemonError> {
        let mine =
            |key: &String| crate::model::split_key(key).map(|(_, n)| n) == Some(self.node.name());
        let mut keys: BTreeSet<String> = match only {
            Some(changed) => changed.iter().filter(|k| mine(k)).cloned().collect(),
            None => self.node.keys().into_iter().filter(mine).collect(),
        };
        if keys.is_empty() {
            return Ok(());
        }
        let store = self.node.store().clone();
        let mut owned = None;
        if only.is_none() {
            // Files of documents that are gone.
            let files = store.owned_files().await?;
            keys.extend(files.iter().map(|o| o.key.clone()));
            owned = Some(files);
        }
        for key in keys {
            let current = self.node.heads(&key).await;
            let done = self
                .done
                .get(&key)
                .filter(|d| current.as_ref() == Some(&d.heads));
            let (wanted, heads) = match done {
                // Only this edge's own report changed it since.
                Some(_) if only.is_some() => continue,
                Some(done) => (Some(done.wanted.clone()), done.heads.clone()),
                None => match self.wanted(&key).await? {
                    Some((wanted, heads)) => (Some(wanted), heads),
                    None => (None, Vec::new()),
                },
            };
            let digest = wanted.as_ref().map(Wanted::digest);
            if only.is_some()
                && let Some(done) = self.done.get_mut(&key)
                && Some(done.digest) == digest
            {
                // Changed, but not in what it asks of this edge (a head wrote a condition).
                done.heads = heads;
                continue;
            }
            let all = match &owned {
                Some(files) => files,
                None => owned.insert(store.owned_files().await?),
            };
            let owned: Vec<OwnedFile> = all.iter().filter(|o| o.key == key).cloned().collect();
            match wanted {
                Some(wanted) => {
                    let heads = self.apply(&key, wanted.clone(), &owned, heads).await?;
                    let digest = digest.expect("set with wanted");
                    self.done.insert(
                        key,
                        Done {
                            heads,
                            digest,
                            wanted,
                        },
                    );
                }
                None => {
                    self.write(&Wanted::default(), &owned).await?;
                    self.done.remove(&key);
                    self.applied.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// What document `key` asks for and the heads it was read at, or None if there is no
    /// such document.
    async fn wanted(&self, key: &str) -> Result<Option<(Wanted, Vec<ChangeHash>)>, DaemonError> {
        let Some((view, heads)) = self.node.view_at(key).await? else {
            return Ok(None);
        };
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
                phase: None,
            });
        }
        Ok(Some((wanted, heads)))
    }

    /// Writes and removes the files of document `key` (read at `read_at`), then reports its
    /// pods' states. Returns the heads to remember for it: after the report, unless something
    /// else changed it since it was read.
    async fn apply(
        &mut self,
        key: &str,
        mut wanted: Wanted,
        owned: &[OwnedFile],
        read_at: Vec<ChangeHash>,
    ) -> Result<Vec<ChangeHash>, DaemonError> {
        let blocked = self.write(&wanted, owned).await?;
        for blocked in blocked {
            if let Some(p) = wanted.pods.iter_mut().find(|p| p.name == blocked.pod) {
                p.state = POD_REFUSED.into();
                p.reason = Some(format!(
                    "{} exists in the manifest directory and was not written by edgesync",
                    blocked.file
                ));
            }
        }
        let reported = self
            .node
            .report_status(key, wanted.generation, &wanted.pods)
            .await?;
        let heads = match reported {
            Some(at) if at.before == read_at => at.after,
            _ => read_at,
        };
        let namespace = crate::model::split_key(key).map_or("", |(ns, _)| ns);
        let applied = wanted.pods.into_iter().map(|p| {
            let file = manifests::file_name(namespace, &p.name);
            // A pod refused after being applied keeps its previous manifest.
            let kept = owned
                .iter()
                .any(|o| o.file == file && wanted.refused_files.contains(&o.file));
            let written = p.state == POD_APPLIED || kept;
            AppliedPod {
                edgenode: key.to_string(),
                pod: p.name,
                file: written.then_some(file),
                state: p.state,
                reason: p.reason,
            }
        });
        self.applied.insert(key.to_string(), applied.collect());
        Ok(heads)
    }

    /// Makes the files of one document (owning `owned`) what `wanted` asks; returns the pods
    /// whose file name is taken by a file edgesync did not write.
    async fn write(
        &self,
        wanted: &Wanted,
        owned: &[OwnedFile],
    ) -> Result<Vec<Desired>, DaemonError> {
        let store = self.node.store();
        let plan = manifests::plan(&wanted.desired, owned, &wanted.refused_files, |f| {
            manifests::inspect(&self.dir, f)
        });
        for want in &plan.write {
            let Some(path) = manifests::path_in(&self.dir, &want.file) else {
                continue;
            };
            store
                .own_file(OwnedFile {
                    file: want.file.clone(),
                    key: want.key.clone(),
                    pod: want.pod.clone(),
                    sha256: want.sha256(),
                })
                .await?;
            fsutil::write_atomic(&path, &want.content, 0o600)
                .map_err(|source| io_err(&path, source))?;
            info!(file = %path.display(), doc = %want.key, "manifest written");
        }
        for gone in &plan.remove {
            if let Some(path) = manifests::path_in(&self.dir, &gone.file) {
                match std::fs::remove_file(&path) {
                    Ok(()) => info!(file = %path.display(), "manifest removed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(io_err(&path, source)),
                }
            }
            store.disown_file(gone.file.clone()).await?;
        }
        for replaced in &plan.disown {
            warn!(file = %replaced.file, "someone replaced this manifest with their own content; leaving it and forgetting it");
            store.disown_file(replaced.file.clone()).await?;
        }
        for blocked in &plan.blocked {
            warn!(file = %blocked.file, "a file edgesync did not write has this name; leaving it alone");
        }
        Ok(plan.blocked)
    }
}
