//! Users of the heads of a cluster in the Kubernetes API: one User resource per user (spec: the
//! administrator's decision; status: the secret's hash, the AUP acceptance, access) and one
//! AcceptableUsePolicy per AUP version. Every read goes to the API, so any head serves any
//! user. New objects are created if absent (409: someone has it); changes are merge patches
//! carrying the resourceVersion they were decided on (409: changed meanwhile, decide again).
//! Each change is recorded as a Kubernetes Event on its object.

use super::{ATTEMPTS, Aup, Change, DEFAULT_AUP, Note, Record, UserError, rfc3339};
use crate::clock::unix_now;
use crate::crd::user::{
    AcceptableUsePolicy, AcceptableUsePolicySpec, EMAIL_LABEL, User as UserObject, UserSpec,
    aup_name,
};
use crate::head::cluster::{patch_params, post_params};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// Reporting controller of the Events the heads record.
pub const REPORTER: &str = "edgesync-head";
/// Label on every object edgesync makes.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "edgesync");
/// A registration whose secret was not stored within this time was abandoned (its head
/// stopped half-way) and is removed.
const ABANDONED_AFTER: i64 = 120;

/// The users and AUP versions in one cluster.
#[derive(Clone)]
pub struct Cluster {
    users: Api<UserObject>,
    aups: Api<AcceptableUsePolicy>,
    recorder: Recorder,
}

/// An API error about `object`, for the administrator to act on.
fn api_err(object: &str, e: kube::Error) -> UserError {
    match e {
        kube::Error::Api(s) => UserError::Cluster(format!("{object}: {}", s.message)),
        e => UserError::Cluster(format!("{object}: {e}")),
    }
}

/// An error listing `plural`: 404 means the resource is not served.
fn list_err(plural: &str, e: kube::Error) -> UserError {
    if is_status(&e, 404) {
        return UserError::Cluster(format!(
            "{plural}.edgesync.io is not served; apply deploy/crd-{plural}.yaml"
        ));
    }
    api_err(plural, e)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The value of [`EMAIL_LABEL`] for `email`.
pub fn email_label(email: &str) -> String {
    let mut hex = hex::encode(Sha256::digest(email.to_ascii_lowercase().as_bytes()));
    hex.truncate(63);
    hex
}

fn unix(rfc3339: &str) -> Option<i64> {
    rfc3339.parse::<Timestamp>().ok().map(|t| t.as_second())
}

fn created_at(object: &UserObject) -> i64 {
    object
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

/// Whether `object` is a registration whose head stopped before storing the secret.
fn abandoned(object: &UserObject, now: i64) -> bool {
    let secret = object
        .status
        .as_ref()
        .and_then(|s| s.secret_sha256.as_ref());
    secret.is_none() && created_at(object) + ABANDONED_AFTER < now
}

/// The record of a User; None while its registration is not complete (no secret yet).
fn record(object: &UserObject) -> Option<Record> {
    let status = object.status.clone().unwrap_or_default();
    let secret = hex::decode(status.secret_sha256?).ok()?;
    let aup = status.aup;
    Some(Record {
        username: object.metadata.name.clone()?,
        uid: object.metadata.uid.clone().unwrap_or_default(),
        email: object.spec.email.clone(),
        full_name: object.spec.full_name.clone(),
        secret,
        status: object.spec.approval,
        aup_version: aup.as_ref().map(|a| a.version),
        aup_accepted_at: aup.as_ref().and_then(|a| unix(&a.accepted_at)),
        aup_expires_at: aup.as_ref().and_then(|a| unix(&a.expires_at)),
        access: status.access_granted.unwrap_or(false),
        signed_out_at: status.signed_out_at.as_deref().and_then(unix),
        revision: object.metadata.resource_version.clone().unwrap_or_default(),
    })
}

/// The merge patch that makes `change`, if the object still has `revision`, and whether it goes
/// to the status subresource.
fn patch_of(change: &Change, revision: &str) -> (serde_json::Value, bool) {
    let guard = json!({"resourceVersion": revision});
    match change {
        Change::Status(status) => (
            json!({"metadata": guard, "spec": {"approval": status.as_str()}}),
            false,
        ),
        Change::Accept {
            version,
            accepted_at,
            expires_at,
        } => (
            json!({"metadata": guard, "status": {"aup": {
                "version": version,
                "acceptedAt": rfc3339(Some(*accepted_at)),
                "expiresAt": rfc3339(Some(*expires_at)),
            }}}),
            true,
        ),
        Change::Access(access) => (
            json!({"metadata": guard, "status": {"accessGranted": access}}),
            true,
        ),
        Change::SignOut(at) => (
            json!({"metadata": guard, "status": {"signedOutAt": rfc3339(Some(*at))}}),
            true,
        ),
    }
}

impl Cluster {
    /// The users of the cluster `client` reaches; `head` names this head in Events.
    pub fn new(client: kube::Client, head: &str) -> Cluster {
        let reporter = Reporter {
            controller: REPORTER.into(),
            instance: Some(head.to_string()),
        };
        Cluster {
            users: Api::all(client.clone()),
            aups: Api::all(client.clone()),
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Records `note` as an Event on `regarding`; a failure is logged, not returned (the
    /// change itself is made).
    async fn record(&self, regarding: &ObjectReference, note: &Note) {
        let (reason, action) = note.action.event();
        let text = match note.detail.as_str() {
            "" => format!("by {}", note.actor),
            detail => format!("{detail}; by {}", note.actor),
        };
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(text),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            warn!(object = ?regarding.name, %reason, error = %e, "cannot record the event");
        }
    }

    /// The highest AUP version, if there is any.
    async fn newest(&self) -> Result<Option<Aup>, UserError> {
        let list = self
            .aups
            .list(&ListParams::default())
            .await
            .map_err(|e| list_err("acceptableusepolicies", e))?;
        Ok(list
            .items
            .into_iter()
            .max_by_key(|a| a.spec.version)
            .map(|a| Aup {
                version: a.spec.version,
                text: a.spec.text,
            }))
    }

    /// Creates AUP `version`; None when it exists already (another head was first).
    async fn create_aup(
        &self,
        version: i64,
        text: String,
    ) -> Result<Option<AcceptableUsePolicy>, UserError> {
        let name = aup_name(version);
        let mut object = AcceptableUsePolicy::new(&name, AcceptableUsePolicySpec { version, text });
        object.metadata.labels = Some([(MANAGED_BY.0.into(), MANAGED_BY.1.into())].into());
        match self.aups.create(&post_params(), &object).await {
            Ok(created) => Ok(Some(created)),
            Err(e) if is_status(&e, 409) => Ok(None),
            Err(e) => Err(api_err(&format!("AcceptableUsePolicy {name}"), e)),
        }
    }

    /// The current AUP; the embedded one becomes version 1 when there is none.
    pub(super) async fn aup(&self) -> Result<Aup, UserError> {
        for _ in 0..ATTEMPTS {
            if let Some(aup) = self.newest().await? {
                return Ok(aup);
            }
            if let Some(created) = self.create_aup(1, DEFAULT_AUP.to_string()).await? {
                info!("no AcceptableUsePolicy in the cluster: published the embedded one as v1");
                return Ok(Aup {
                    version: created.spec.version,
                    text: created.spec.text,
                });
            }
        }
        Err(UserError::Conflict(
            "AcceptableUsePolicy v1 exists but cannot be listed; try again".into(),
        ))
    }

    /// Publishes `text` as the next AUP version; when another head publishes one at the same
    /// time, this one takes the version after it.
    pub(super) async fn publish(&self, text: String, note: &Note) -> Result<Aup, UserError> {
        for _ in 0..ATTEMPTS {
            let next = self.newest().await?.map_or(1, |a| a.version + 1);
            if let Some(created) = self.create_aup(next, text.clone()).await? {
                let note = Note {
                    detail: format!("version {next}"),
                    ..note.clone()
                };
                self.record(&created.object_ref(&()), &note).await;
                return Ok(Aup {
                    version: next,
                    text: created.spec.text,
                });
            }
        }
        Err(UserError::Conflict(
            "AUP versions keep being published by other heads; try again".into(),
        ))
    }

    /// The user `username`, if their registration is complete.
    pub(super) async fn find(&self, username: &str) -> Result<Option<Record>, UserError> {
        let found = self
            .users
            .get_opt(username)
            .await
            .map_err(|e| api_err(&format!("User {username}"), e))?;
        Ok(found.as_ref().and_then(record))
    }

    /// Every user whose registration is complete.
    pub(super) async fn list(&self) -> Result<Vec<Record>, UserError> {
        let list = self
            .users
            .list(&ListParams::default())
            .await
            .map_err(|e| list_err("users", e))?;
        Ok(list.items.iter().filter_map(record).collect())
    }

    /// Deletes the User `name` if it is still registration `uid`.
    async fn remove(&self, name: &str, uid: &str) {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = self.users.delete(name, &params).await
            && !is_status(&e, 404)
        {
            warn!(user = %name, error = %e, "cannot remove an incomplete registration; it is removed later");
        }
    }

    /// Creates the user: the User object (409: the username is taken), then a check that no
    /// other registration holds the e-mail, then the secret's hash in its status. Two heads
    /// registering one address at once both create before they check, so at least one sees the
    /// other: one is refused, or, when they check at the same moment, both are.
    pub(super) async fn insert(
        &self,
        record: &Record,
        notes: &[Note],
    ) -> Result<Option<&'static str>, UserError> {
        let name = &record.username;
        let object_name = format!("User {name}");
        let label = email_label(&record.email);
        let mut object = UserObject::new(
            name,
            UserSpec {
                email: record.email.clone(),
                full_name: record.full_name.clone(),
                approval: record.status,
            },
        );
        object.metadata.labels = Some(
            [
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (EMAIL_LABEL.to_string(), label.clone()),
            ]
            .into(),
        );
        let created = match self.users.create(&post_params(), &object).await {
            Ok(created) => created,
            Err(e) if is_status(&e, 409) => return Ok(Some("username")),
            Err(e) => return Err(api_err(&object_name, e)),
        };
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let holders = self
            .users
            .list(&ListParams::default().labels(&format!("{EMAIL_LABEL}={label}")))
            .await;
        let now = unix_now();
        let taken = match holders {
            Ok(list) => list
                .items
                .iter()
                .any(|u| u.metadata.uid.as_deref() != Some(&uid) && !abandoned(u, now)),
            Err(e) => {
                self.remove(name, &uid).await;
                return Err(list_err("users", e));
            }
        };
        if taken {
            self.remove(name, &uid).await;
            return Ok(Some("email"));
        }
        let secret = json!([
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": "/status", "value": {"secretSHA256": hex::encode(&record.secret)}},
        ]);
        let patch = serde_json::from_value(secret)
            .map_err(|e| UserError::Cluster(format!("{object_name}: status: {e}")))?;
        let stored = self
            .users
            .patch_status(name, &patch_params(), &Patch::<()>::Json(patch))
            .await;
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                self.remove(name, &uid).await;
                return Err(api_err(&format!("{object_name} status.secretSHA256"), e));
            }
        };
        let regarding = stored.object_ref(&());
        for note in notes {
            self.record(&regarding, note).await;
        }
        Ok(None)
    }

    /// Applies `change` if the User is still at `old.revision`; false when it changed.
    pub(super) async fn update(
        &self,
        old: &Record,
        change: &Change,
        note: &Note,
    ) -> Result<bool, UserError> {
        let name = &old.username;
        let (patch, status) = patch_of(change, &old.revision);
        let patch = Patch::Merge(&patch);
        let patched = if status {
            self.users.patch_status(name, &patch_params(), &patch).await
        } else {
            self.users.patch(name, &patch_params(), &patch).await
        };
        match patched {
            Ok(object) => {
                self.record(&object.object_ref(&()), note).await;
                Ok(true)
            }
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) if is_status(&e, 404) => Err(UserError::NotFound(name.clone())),
            Err(e) => {
                let field = if status { "status" } else { "spec" };
                Err(api_err(&format!("User {name} {field}"), e))
            }
        }
    }

    /// Deletes registrations abandoned half-way (no secret long after their creation), each only
    /// if it is still unchanged.
    pub(super) async fn forget_abandoned(&self) -> Result<(), UserError> {
        let list = self
            .users
            .list(&ListParams::default())
            .await
            .map_err(|e| list_err("users", e))?;
        let now = unix_now();
        for object in list.items.iter().filter(|u| abandoned(u, now)) {
            let name = object.metadata.name.clone().unwrap_or_default();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: object.metadata.uid.clone(),
                    resource_version: object.metadata.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            match self.users.delete(&name, &params).await {
                Ok(_) => info!(user = %name, "removed a registration that was never completed"),
                Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                Err(e) => return Err(api_err(&format!("User {name}"), e)),
            }
        }
        Ok(())
    }

    /// Yields whenever a User or an AcceptableUsePolicy changes.
    pub(super) fn changes(&self) -> BoxStream<'static, ()> {
        let users = watcher(self.users.clone(), watcher::Config::default())
            .default_backoff()
            .filter_map(wake);
        let aups = watcher(self.aups.clone(), watcher::Config::default())
            .default_backoff()
            .filter_map(wake);
        futures_util::stream::select(users, aups).boxed()
    }
}

/// Whether a watch event means something changed.
async fn wake<K>(event: Result<watcher::Event<K>, watcher::Error>) -> Option<()> {
    match event {
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
            Some(())
        }
        Ok(_) => None,
        Err(e) => {
            debug!(error = %e, "watching users failed; retrying");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::user::{Approval, AupAcceptance, UserStatus};

    fn object(status: Option<UserStatus>, created: i64) -> UserObject {
        let mut object = UserObject::new(
            "ada",
            UserSpec {
                email: "ada@example.org".into(),
                full_name: "Ada".into(),
                approval: Approval::Approved,
            },
        );
        object.metadata.uid = Some("u1".into());
        object.metadata.resource_version = Some("7".into());
        object.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(created).unwrap(),
            ));
        object.status = status;
        object
    }

    #[test]
    fn a_user_without_a_secret_is_not_a_user_yet_and_later_abandoned() {
        let now = 1_000_000;
        let fresh = object(None, now - 5);
        assert!(record(&fresh).is_none());
        assert!(!abandoned(&fresh, now));
        assert!(abandoned(&object(None, now - ABANDONED_AFTER - 1), now));
        let status = UserStatus {
            secret_sha256: Some(hex::encode([7u8; 32])),
            aup: Some(AupAcceptance {
                version: 2,
                accepted_at: "2025-01-01T00:00:00Z".into(),
                expires_at: "not a time".into(),
            }),
            access_granted: Some(true),
            signed_out_at: Some("2025-01-02T00:00:00Z".into()),
        };
        let complete = object(Some(status), now - ABANDONED_AFTER - 1);
        assert!(!abandoned(&complete, now));
        let r = record(&complete).unwrap();
        assert_eq!(r.signed_out_at, Some(1_735_776_000));
        assert_eq!(
            (r.uid.as_str(), r.revision.as_str(), r.secret.len()),
            ("u1", "7", 32)
        );
        assert_eq!(r.aup_version, Some(2));
        assert_eq!(r.aup_accepted_at, Some(1_735_689_600));
        assert_eq!(r.aup_expires_at, None, "an unreadable expiry is no expiry");
        assert!(r.access);
    }

    #[test]
    fn changes_are_guarded_by_the_resource_version_they_were_decided_on() {
        let (patch, status) = patch_of(&Change::Status(Approval::Revoked), "41");
        assert!(!status);
        assert_eq!(
            patch,
            json!({"metadata": {"resourceVersion": "41"}, "spec": {"approval": "Revoked"}})
        );
        let accept = Change::Accept {
            version: 3,
            accepted_at: 0,
            expires_at: 3600,
        };
        let (patch, status) = patch_of(&accept, "42");
        assert!(status);
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(
            patch["status"]["aup"],
            json!({"version": 3, "acceptedAt": "1970-01-01T00:00:00Z", "expiresAt": "1970-01-01T01:00:00Z"})
        );
        let (patch, _) = patch_of(&Change::Access(false), "43");
        assert_eq!(patch["status"], json!({"accessGranted": false}));
    }

    #[test]
    fn the_email_label_ignores_case_and_fits_a_label_value() {
        let label = email_label("Ada@Example.org");
        assert_eq!(label, email_label("ada@example.org"));
        assert_eq!(label.len(), 63);
        assert_ne!(label, email_label("bob@example.org"));
    }
}
