//! One writer among several heads: whoever holds the coordination.k8s.io Lease
//! `edgesync-writer` writes to the API server; the others stand by and take it over when its
//! holder stops renewing. Expiry is judged by how long the record has stood unchanged as seen
//! here, not by comparing clocks with the holder. Each head also renews a Lease of its own, so
//! the others can tell when it has stopped.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PostParams};
use kube::runtime::{reflector, watcher};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Name of the writer Lease in the heads' namespace.
pub const LEASE_NAME: &str = "edgesync-writer";

/// Campaigns for the Lease.
pub struct Elector {
    api: Api<Lease>,
    me: String,
    duration: Duration,
    /// The holder's record as last seen, and since when it has stood unchanged.
    observed: Option<((String, Option<String>), Instant)>,
}

impl Elector {
    /// An elector for head `me` in `namespace`, holding the Lease for `duration` per renewal.
    pub fn new(client: kube::Client, namespace: &str, me: &str, duration: Duration) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            me: me.to_string(),
            duration,
            observed: None,
        }
    }

    /// Renews or takes the Lease every third of its duration until shutdown, telling `leading`
    /// whether this head is the writer; gives it up on the way out so another takes over at once.
    pub async fn run(mut self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        // When the last successful renewal was sent; the lead ends 2/3 of a duration after it,
        // before anyone else could see the Lease expire, whatever the API server does meanwhile.
        let mut renewed: Option<Instant> = None;
        let mut tick = tokio::time::interval(self.duration / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let lead_ends = renewed.map(|at| at + self.duration * 2 / 3);
            let step_down = async {
                match lead_ends {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = step_down => renewed = None,
                _ = tick.tick() => {
                    let sent = Instant::now();
                    match tokio::time::timeout(self.duration / 3, self.try_hold()).await {
                        Ok(Ok(true)) => renewed = Some(sent),
                        Ok(Ok(false)) => renewed = None,
                        Ok(Err(e)) => warn!(lease = LEASE_NAME, error = %e, "cannot reach the writer Lease"),
                        Err(_) => warn!(lease = LEASE_NAME, "the API server did not answer in time"),
                    }
                }
            }
            let leader = renewed.is_some_and(|at| at.elapsed() < self.duration * 2 / 3);
            if leading.send_if_modified(|was| std::mem::replace(was, leader) != leader) {
                match leader {
                    true => info!(lease = LEASE_NAME, "this head is now the writer"),
                    false => info!(lease = LEASE_NAME, "this head is no longer the writer"),
                }
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            self.release().await;
        }
    }

    fn record(&self, holder: &str) -> LeaseSpec {
        let now = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: now.clone(),
            renew_time: now,
            ..LeaseSpec::default()
        }
    }

    /// Whether this head holds the Lease after one attempt to renew or take it.
    async fn try_hold(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.record(&self.me)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder == self.me {
            let mut renewed = spec;
            renewed.renew_time = self.record(&self.me).renew_time;
            lease.spec = Some(renewed);
            return conflict_is_false(self.replace(&lease).await);
        }
        let record = (
            holder.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
        );
        if self
            .observed
            .as_ref()
            .is_none_or(|(seen, _)| *seen != record)
        {
            self.observed = Some((record, Instant::now()));
        }
        let their_duration = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let stale = self
            .observed
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed() >= their_duration);
        if !(holder.is_empty() || stale) {
            return Ok(false);
        }
        let mut taken = self.record(&self.me);
        taken.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        lease.spec = Some(taken);
        let held = conflict_is_false(self.replace(&lease).await)?;
        if held {
            info!(lease = LEASE_NAME, previous = %holder, "took over the writer Lease");
        }
        Ok(held)
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.api
            .replace(LEASE_NAME, &PostParams::default(), lease)
            .await
    }

    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return;
        }
        spec.holder_identity = None;
        match self.replace(&lease).await {
            Ok(_) => info!(lease = LEASE_NAME, "gave up the writer Lease"),
            Err(e) => warn!(lease = LEASE_NAME, error = %e, "cannot give up the writer Lease"),
        }
    }
}

/// A write that lost a race (409 Conflict or AlreadyExists) means someone else holds it.
fn conflict_is_false<T>(result: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Prefix of each head's own Lease (`edgesync-head-<name>`), renewed while the head runs, as
/// kubelets renew their node Leases: an edge shown online through a head whose Lease stopped
/// being renewed is shown offline by the heads still running.
pub const HEAD_LEASE_PREFIX: &str = "edgesync-head-";
/// Label on the heads' own Leases, so heads watch only those.
const HEAD_LEASE_LABEL: &str = "edgesync.io/head-lease";

/// The heads' own Leases: this head's renewed, everyone's watched.
pub struct HeadLeases {
    cache: reflector::Store<Lease>,
    duration: Duration,
    started: Instant,
    /// Per head, its Lease's renewTime as last seen and since when it has stood unchanged.
    observed: std::sync::Mutex<std::collections::HashMap<String, (Option<String>, Instant)>>,
}

impl HeadLeases {
    /// Renews head `name`'s Lease every third of `duration` (as `identity`) and watches every
    /// head's, in `namespace`.
    pub fn start(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
        tasks: &mut crate::daemon::Tasks,
    ) -> std::sync::Arc<HeadLeases> {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let selector = format!("{HEAD_LEASE_LABEL}=true");
        let config = watcher::Config::default().labels(&selector);
        let cache = crate::head::cluster::cache(api.clone(), config, tasks, |_| {});
        tasks.spawn(heartbeat(
            api,
            format!("{HEAD_LEASE_PREFIX}{name}"),
            identity.to_string(),
            duration,
            tasks.token(),
        ));
        std::sync::Arc::new(HeadLeases {
            cache,
            duration,
            started: Instant::now(),
            observed: Default::default(),
        })
    }

    /// Whether head `name` has stopped: its Lease has stood unrenewed (or absent) for a whole
    /// duration as seen from here. Judged by this head's clock only, as the writer Lease is.
    pub fn gone(&self, name: &str) -> bool {
        let lease = self.cache.get(&reflector::ObjectRef::new(&format!(
            "{HEAD_LEASE_PREFIX}{name}"
        )));
        let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
        let renewed = spec.and_then(|s| s.renew_time.as_ref().map(|t| t.0.to_string()));
        let duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let since = match observed.get(name) {
            Some((seen, since)) if *seen == renewed => *since,
            _ => {
                // Absent since this head started, or renewed just now.
                let since = if renewed.is_none() {
                    self.started
                } else {
                    Instant::now()
                };
                observed.insert(name.to_string(), (renewed, since));
                since
            }
        };
        since.elapsed() >= duration
    }
}

/// Renews `lease` every third of `duration` until shutdown.
async fn heartbeat(
    api: Api<Lease>,
    lease: String,
    identity: String,
    duration: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(duration / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let spec = LeaseSpec {
            holder_identity: Some(identity.clone()),
            lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
            renew_time: Some(now),
            ..LeaseSpec::default()
        };
        let patch = serde_json::json!({
            "metadata": {"labels": {HEAD_LEASE_LABEL: "true"}},
            "spec": spec,
        });
        let params = crate::head::cluster::patch_params();
        let result = match api.patch(&lease, &params, &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let object = Lease {
                    metadata: ObjectMeta {
                        name: Some(lease.clone()),
                        labels: Some([(HEAD_LEASE_LABEL.into(), "true".into())].into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                api.create(&crate::head::cluster::post_params(), &object)
                    .await
                    .map(drop)
            }
            other => other.map(drop),
        };
        if let Err(e) = result {
            warn!(%lease, error = %e, "cannot renew this head's Lease");
        }
    }
}
