//! One writer among several heads: whoever holds the coordination.k8s.io Lease
//! `edgesync-writer` writes to the API server; the others stand by and take it over when its
//! holder stops renewing. Expiry is judged by how long the record has stood unchanged as seen
//! here, not by comparing clocks with the holder.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
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
