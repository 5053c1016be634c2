//! People who use the cluster through the head: registration, approval, the Acceptable Use
//! Policy and its expiry, and who currently has cluster access. The rules live here, once; the
//! records live in one of two backends: the head's SQLite database when it runs standalone
//! ([`sqlite`]), or the User and AcceptableUsePolicy resources of the Kubernetes API when it
//! has a cluster ([`cluster`]), so that every head serves every user. Each change is made with
//! compare-and-set against what its rule was checked on, retried when someone else (another
//! head, an administrator with kubectl) changed the user in between, and logged with its actor.

pub mod cluster;
pub mod sqlite;

use crate::clock::unix_now;
use crate::store::{Store, StoreError};
use crate::transport::tls::random_bytes;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tracing::{debug, info};

/// The policy shown until an administrator sets one with `edgesync aup set -f FILE`.
pub const DEFAULT_AUP: &str = include_str!("default-aup.txt");
/// How often a change is tried again when the user changed under it.
const ATTEMPTS: usize = 8;

/// Why a request about users failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A field is missing or malformed (422).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The username or e-mail is taken (409).
    #[error("{field} is already registered")]
    Duplicate {
        /// username or email.
        field: &'static str,
    },
    /// Wrong or missing secret, or no such user (401; says nothing about which).
    #[error("invalid credentials")]
    Unauthorized,
    /// The user may not do this now (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such user (404; administrators only).
    #[error("no user {0:?}")]
    NotFound(String),
    /// The state does not allow it (409), e.g. no cluster.
    #[error("{0}")]
    Conflict(String),
    /// The cluster refused or failed (502).
    #[error("cluster: {0}")]
    Cluster(String),
    /// The database failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl UserError {
    fn invalid(field: &str, reason: impl Into<String>) -> UserError {
        UserError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The field an error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            UserError::Invalid { field, .. } => Some(field),
            UserError::Duplicate { field } => Some(field),
            _ => None,
        }
    }
}

/// Status of a user: the administrator's decision, as the User resource writes it.
pub use crate::crd::user::Approval as Status;

/// An administrator's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Approve.
    Approve,
    /// Reject.
    Reject,
    /// Revoke.
    Revoke,
}

impl Decision {
    /// Parses `approve`, `reject` or `revoke`.
    pub fn parse(text: &str) -> Option<Decision> {
        match text {
            "approve" => Some(Decision::Approve),
            "reject" => Some(Decision::Reject),
            "revoke" => Some(Decision::Revoke),
            _ => None,
        }
    }

    fn status(self) -> Status {
        match self {
            Decision::Approve => Status::Approved,
            Decision::Reject => Status::Rejected,
            Decision::Revoke => Status::Revoked,
        }
    }

    /// Whether the decision may be made about a user who is `current`; None when it is
    /// already in force (approving an approved user succeeds and changes nothing).
    fn allowed(self, current: Status) -> Option<bool> {
        match self {
            Decision::Approve if current == Status::Approved => None,
            Decision::Approve => Some(true),
            Decision::Reject => Some(current == Status::Pending),
            Decision::Revoke => Some(current == Status::Approved),
        }
    }
}

/// A registration request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// DNS-1123 label; also the user's namespace.
    pub username: String,
    /// Contact address.
    pub email: String,
    /// Full name.
    pub full_name: String,
}

/// Whether `name` is kept from users, because it is (or may become) a namespace of the system
/// or of edgesync itself.
pub fn reserved(name: &str, also: &[String]) -> bool {
    name == "default"
        || ["kube-", "openshift-", "edgesync"]
            .iter()
            .any(|p| name.starts_with(p))
        || also.iter().any(|n| n == name)
}

impl Registration {
    /// Checks every field; the first problem is returned. `reserved` names are refused.
    pub fn validate(&self, reserved_names: &[String]) -> Result<(), UserError> {
        crate::input::check_label(&self.username)
            .map_err(|r| UserError::invalid("username", r.to_string()))?;
        if reserved(&self.username, reserved_names) {
            return Err(UserError::invalid(
                "username",
                "is reserved (system and edgesync namespaces); choose another",
            ));
        }
        check_email(&self.email)?;
        let name = self.full_name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(UserError::invalid(
                "fullName",
                "must be 1 to 200 characters, without control characters",
            ));
        }
        Ok(())
    }
}

fn check_email(email: &str) -> Result<(), UserError> {
    crate::input::check_email(email)
        .map_err(|_| UserError::invalid("email", "is not an e-mail address like name@example.org"))
}

/// The user's acceptance of the AUP.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Acceptance {
    /// AUP version accepted (None: never).
    pub version: Option<i64>,
    /// When (RFC 3339).
    pub accepted_at: Option<String>,
    /// Until when (RFC 3339).
    pub expires_at: Option<String>,
    /// Accepted the current version and not expired.
    pub valid: bool,
}

/// A user as shown to themselves and to administrators.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Username.
    pub username: String,
    /// Random id of this registration: marks the namespace made for it as theirs.
    #[serde(skip)]
    pub uid: String,
    /// E-mail.
    pub email: String,
    /// Full name.
    pub full_name: String,
    /// Pending, Approved, Rejected or Revoked.
    pub status: Status,
    /// Acceptance of the AUP.
    pub aup: Acceptance,
    /// Whether the user's RoleBinding currently exists.
    #[serde(skip)]
    pub access: bool,
    /// When they last signed out of the portal (unix seconds): sessions issued before end.
    #[serde(skip)]
    pub signed_out_at: Option<i64>,
}

impl User {
    /// Whether the user may hold cluster credentials now.
    pub fn may_use_cluster(&self) -> bool {
        self.status == Status::Approved && self.aup.valid
    }

    /// Why the user may not hold cluster credentials now (403), if they may not.
    pub fn refusal(&self) -> Option<UserError> {
        if self.may_use_cluster() {
            return None;
        }
        Some(UserError::Forbidden(if self.aup.valid {
            format!("user {} is {}, not Approved", self.username, self.status)
        } else {
            format!(
                "the Acceptable Use Policy is not accepted or has expired; accept it with POST /api/v1/users/{}/aup",
                self.username
            )
        }))
    }
}

/// The current policy text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aup {
    /// Version, increasing with each `aup set`.
    pub version: i64,
    /// Text.
    pub text: String,
}

/// Settings of the user registry.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Approve registrations at once.
    pub auto_approve: bool,
    /// How long an acceptance lasts.
    pub aup_validity: Duration,
    /// Usernames refused besides the built-in reserved ones (namespaces the head uses).
    pub reserved: Vec<String>,
}

/// A user as a backend keeps them.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    username: String,
    uid: String,
    email: String,
    full_name: String,
    /// SHA-256 of the secret.
    secret: Vec<u8>,
    status: Status,
    aup_version: Option<i64>,
    aup_accepted_at: Option<i64>,
    aup_expires_at: Option<i64>,
    access: bool,
    signed_out_at: Option<i64>,
    /// What a guarded write compares against: the resourceVersion in the cluster (SQLite
    /// compares the fields themselves).
    revision: String,
}

/// One change to a user, decided by a rule on the record it is applied to.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    /// The administrator's decision.
    Status(Status),
    /// An acceptance of AUP `version`, at and until unix times.
    Accept {
        version: i64,
        accepted_at: i64,
        expires_at: i64,
    },
    /// Whether the RoleBinding exists.
    Access(bool),
    /// Signed out of the portal at this unix time.
    SignOut(i64),
}

/// What happened, for the audit trail (SQLite rows or Kubernetes Events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Register,
    Decide(Status),
    AupAccept,
    AupSet,
    Access(bool),
    SignOut,
}

impl Action {
    /// The action as written in the audit table.
    fn audit(self) -> String {
        match self {
            Action::Register => "register".into(),
            Action::Decide(status) => status.as_str().to_lowercase(),
            Action::AupAccept => "aup-accept".into(),
            Action::AupSet => "aup-set".into(),
            Action::Access(true) => "access-granted".into(),
            Action::Access(false) => "access-removed".into(),
            Action::SignOut => "sign-out".into(),
        }
    }

    /// The Event's reason (what happened) and action (what was done).
    fn event(self) -> (&'static str, &'static str) {
        match self {
            Action::Register => ("Registered", "Register"),
            Action::Decide(Status::Approved) => ("Approved", "Approve"),
            Action::Decide(Status::Rejected) => ("Rejected", "Reject"),
            Action::Decide(Status::Revoked) => ("Revoked", "Revoke"),
            Action::Decide(Status::Pending) => ("Pending", "Reset"),
            Action::AupAccept => ("AUPAccepted", "AcceptAUP"),
            Action::AupSet => ("AUPPublished", "PublishAUP"),
            Action::Access(true) => ("AccessGranted", "GrantAccess"),
            Action::Access(false) => ("AccessRemoved", "RemoveAccess"),
            Action::SignOut => ("SignedOut", "SignOut"),
        }
    }
}

/// Who did what, and why.
#[derive(Debug, Clone)]
struct Note {
    actor: String,
    action: Action,
    detail: String,
}

impl Note {
    fn new(actor: &str, action: Action, detail: impl Into<String>) -> Note {
        Note {
            actor: actor.to_string(),
            action,
            detail: detail.into(),
        }
    }

    /// Into the head's log.
    fn log(&self, subject: &str) {
        info!(actor = %self.actor, action = %self.action.audit(), %subject, detail = %self.detail, "user registry changed");
    }
}

/// Where the records are.
#[derive(Clone)]
enum Backend {
    /// The head's database (standalone).
    Sqlite(sqlite::Sqlite),
    /// The Kubernetes API (a head with a cluster).
    Cluster(Box<cluster::Cluster>),
}

impl Backend {
    async fn aup(&self) -> Result<Aup, UserError> {
        match self {
            Backend::Sqlite(db) => Ok(db.aup().await?),
            Backend::Cluster(api) => api.aup().await,
        }
    }

    async fn publish(&self, text: String, note: &Note) -> Result<Aup, UserError> {
        match self {
            Backend::Sqlite(db) => Ok(db.publish(text, note.clone()).await?),
            Backend::Cluster(api) => api.publish(text, note).await,
        }
    }

    async fn find(&self, username: &str) -> Result<Option<Record>, UserError> {
        match self {
            Backend::Sqlite(db) => Ok(db.find(username).await?),
            Backend::Cluster(api) => api.find(username).await,
        }
    }

    async fn list(&self) -> Result<Vec<Record>, UserError> {
        match self {
            Backend::Sqlite(db) => Ok(db.list().await?),
            Backend::Cluster(api) => api.list().await,
        }
    }

    /// Stores a new user; Duplicate when the username or e-mail is taken.
    async fn insert(&self, record: &Record, notes: &[Note]) -> Result<(), UserError> {
        let taken = match self {
            Backend::Sqlite(db) => db.insert(record.clone(), notes.to_vec()).await?,
            Backend::Cluster(api) => api.insert(record, notes).await?,
        };
        match taken {
            Some(field) => Err(UserError::Duplicate { field }),
            None => Ok(()),
        }
    }

    /// Applies `change` if the user is still as in `old`; false when they changed meanwhile.
    async fn update(&self, old: &Record, change: &Change, note: &Note) -> Result<bool, UserError> {
        match self {
            Backend::Sqlite(db) => Ok(db.update(old.clone(), change.clone(), note.clone()).await?),
            Backend::Cluster(api) => api.update(old, change, note).await,
        }
    }
}

/// The user registry.
#[derive(Clone)]
pub struct Users {
    backend: Backend,
    policy: Policy,
}

fn rfc3339(unix: Option<i64>) -> Option<String> {
    unix.and_then(|s| Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// `record` as shown, with its acceptance checked against the `current` AUP version at `now`.
fn shown(record: Record, current: i64, now: i64) -> User {
    let valid =
        record.aup_version == Some(current) && record.aup_expires_at.is_some_and(|e| e > now);
    User {
        username: record.username,
        uid: record.uid,
        email: record.email,
        full_name: record.full_name,
        status: record.status,
        aup: Acceptance {
            version: record.aup_version,
            accepted_at: rfc3339(record.aup_accepted_at),
            expires_at: rfc3339(record.aup_expires_at),
            valid,
        },
        access: record.access,
        signed_out_at: record.signed_out_at,
    }
}

impl Users {
    /// The registry in `store` (a standalone head); puts the embedded AUP in place if none was
    /// ever set.
    pub async fn open(store: Store, policy: Policy) -> Result<Users, StoreError> {
        Ok(Users {
            backend: Backend::Sqlite(sqlite::Sqlite::open(store).await?),
            policy,
        })
    }

    /// The registry in the cluster's User and AcceptableUsePolicy resources, shared by every
    /// head of the cluster; `head` names this head in the Events it records. Creates the
    /// embedded AUP as version 1 when the cluster has none.
    pub async fn open_cluster(
        client: kube::Client,
        head: &str,
        policy: Policy,
    ) -> Result<Users, UserError> {
        let users = Users {
            backend: Backend::Cluster(Box::new(cluster::Cluster::new(client, head))),
            policy,
        };
        users.aup().await?;
        Ok(users)
    }

    /// The current AUP.
    pub async fn aup(&self) -> Result<Aup, UserError> {
        self.backend.aup().await
    }

    /// Publishes a new AUP version; users must accept it again.
    pub async fn set_aup(&self, text: String, actor: &str) -> Result<Aup, UserError> {
        if text.trim().is_empty() {
            return Err(UserError::invalid("text", "the policy text is empty"));
        }
        let note = Note::new(actor, Action::AupSet, "");
        let aup = self.backend.publish(text, &note).await?;
        Note::new(actor, Action::AupSet, format!("version {}", aup.version)).log("aup");
        Ok(aup)
    }

    /// The record of `username` and how it is shown, if they exist.
    async fn load(&self, username: &str) -> Result<Option<(Record, User)>, UserError> {
        if crate::input::check_label(username).is_err() {
            return Ok(None); // never registered; and never put into a request path
        }
        // Both read whether or not the user exists: the same work either way.
        let (found, aup) = tokio::join!(self.backend.find(username), self.backend.aup());
        let (Some(record), current) = (found?, aup?.version) else {
            return Ok(None);
        };
        let user = shown(record.clone(), current, unix_now());
        Ok(Some((record, user)))
    }

    /// Registers a person; returns them and their secret (shown once, stored only hashed).
    pub async fn register(&self, request: Registration) -> Result<(User, String), UserError> {
        request.validate(&self.policy.reserved)?;
        let secret = hex::encode(random_bytes::<32>());
        let status = if self.policy.auto_approve {
            Status::Approved
        } else {
            Status::Pending
        };
        let record = Record {
            username: request.username.clone(),
            uid: hex::encode(random_bytes::<16>()),
            email: request.email.clone(),
            full_name: request.full_name.trim().to_string(),
            secret: hash(&secret),
            status,
            aup_version: None,
            aup_accepted_at: None,
            aup_expires_at: None,
            access: false,
            signed_out_at: None,
            revision: String::new(),
        };
        let mut notes = vec![Note::new(
            &record.username,
            Action::Register,
            status.as_str(),
        )];
        if status == Status::Approved {
            notes.push(Note::new(
                "policy:auto-approve",
                Action::Decide(Status::Approved),
                "",
            ));
        }
        self.backend.insert(&record, &notes).await?;
        for note in &notes {
            note.log(&record.username);
        }
        let user = self.get(&request.username).await?;
        Ok((user, secret))
    }

    /// The user `username` (administrators).
    pub async fn get(&self, username: &str) -> Result<User, UserError> {
        let (_, user) = self
            .load(username)
            .await?
            .ok_or_else(|| UserError::NotFound(username.to_string()))?;
        Ok(user)
    }

    /// The user `username` if `secret` is theirs; otherwise Unauthorized, whether or not the
    /// user exists, after the same work.
    pub async fn authenticate(&self, username: &str, secret: &str) -> Result<User, UserError> {
        let found = self.load(username).await?;
        let presented = hash(secret);
        let stored = found
            .as_ref()
            .map(|(r, _)| r.secret.as_slice())
            .filter(|s| s.len() == presented.len())
            .unwrap_or([0u8; 32].as_slice());
        let matches: bool = subtle::ConstantTimeEq::ct_eq(presented.as_slice(), stored).into();
        match found {
            Some((_, user)) if matches => Ok(user),
            _ => Err(UserError::Unauthorized),
        }
    }

    /// Applies what `rule` decides about `username` as the user is now, as one compare-and-set:
    /// when the user changed in between (on another head, or by kubectl), the rule is checked
    /// again on the new state. A rule answering None leaves the user as they are.
    async fn modify<F>(&self, username: &str, rule: F) -> Result<User, UserError>
    where
        F: Fn(&User) -> Result<Option<(Change, Note)>, UserError>,
    {
        for _ in 0..ATTEMPTS {
            let (record, user) = self
                .load(username)
                .await?
                .ok_or_else(|| UserError::NotFound(username.to_string()))?;
            let Some((change, note)) = rule(&user)? else {
                return Ok(user);
            };
            if self.backend.update(&record, &change, &note).await? {
                note.log(username);
                return self.get(username).await;
            }
            debug!(user = %username, "user changed meanwhile; checking again");
        }
        Err(UserError::Conflict(format!(
            "user {username} keeps being changed by someone else; try again"
        )))
    }

    /// Ends every portal session of `username` issued before now, on every head.
    pub async fn sign_out(&self, username: &str) -> Result<User, UserError> {
        self.modify(username, |_| {
            let note = Note::new(username, Action::SignOut, "");
            Ok(Some((Change::SignOut(unix_now()), note)))
        })
        .await
    }

    /// Records that the user accepted AUP `version` (which must be the current one).
    pub async fn accept(&self, username: &str, version: i64) -> Result<User, UserError> {
        let current = self.aup().await?.version;
        let validity = i64::try_from(self.policy.aup_validity.as_secs()).unwrap_or(i64::MAX);
        self.modify(username, |user| {
            if matches!(user.status, Status::Rejected | Status::Revoked) {
                return Err(UserError::Forbidden(format!(
                    "user {username} is {}",
                    user.status
                )));
            }
            if version != current {
                return Err(UserError::invalid(
                    "version",
                    format!("the current AUP is version {current}; read it with GET /api/v1/aup"),
                ));
            }
            let now = unix_now();
            let change = Change::Accept {
                version,
                accepted_at: now,
                expires_at: now.saturating_add(validity),
            };
            let note = Note::new(username, Action::AupAccept, format!("version {version}"));
            Ok(Some((change, note)))
        })
        .await
    }

    /// An administrator's decision about `username`.
    pub async fn decide(
        &self,
        username: &str,
        decision: Decision,
        actor: &str,
    ) -> Result<User, UserError> {
        self.modify(username, |user| match decision.allowed(user.status) {
            None => Ok(None),
            Some(true) => {
                let status = decision.status();
                Ok(Some((
                    Change::Status(status),
                    Note::new(actor, Action::Decide(status), ""),
                )))
            }
            Some(false) => Err(UserError::Conflict(format!(
                "user {username} is {}; cannot {}",
                user.status,
                format!("{decision:?}").to_lowercase()
            ))),
        })
        .await
    }

    /// Who did what since `since` (unix seconds), at most `limit` lines. With a cluster the
    /// trail is the User resources' Events, which kubectl shows.
    pub async fn audit(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<crate::store::users::AuditRow>, UserError> {
        match &self.backend {
            Backend::Sqlite(db) => Ok(db.audit(since, limit).await?),
            Backend::Cluster(_) => Err(UserError::Conflict(
                "with a cluster the audit trail is the Events of the User resources: \
                 kubectl get events -A --field-selector involvedObject.kind=User"
                    .into(),
            )),
        }
    }

    /// Every user, by name.
    pub async fn list(&self) -> Result<Vec<User>, UserError> {
        let mut records = self.backend.list().await?;
        let current = self.backend.aup().await?.version;
        records.sort_by(|a, b| a.username.cmp(&b.username));
        let now = unix_now();
        Ok(records
            .into_iter()
            .map(|r| shown(r, current, now))
            .collect())
    }

    /// Records whether the user's cluster access (RoleBinding) exists, with the reason. Access
    /// is recorded only while the user may use the cluster (else 403), and recorded as removed
    /// only while they may not: a decision or acceptance made meanwhile on another head wins.
    pub async fn set_access(
        &self,
        username: &str,
        access: bool,
        actor: &str,
        reason: &str,
    ) -> Result<User, UserError> {
        self.modify(username, |user| {
            if let Some(refusal) = user.refusal().filter(|_| access) {
                return Err(refusal);
            }
            if user.access == access || (!access && user.may_use_cluster()) {
                return Ok(None);
            }
            Ok(Some((
                Change::Access(access),
                Note::new(actor, Action::Access(access), reason),
            )))
        })
        .await
    }

    /// Removes registrations that were never completed (a head stopped between creating the
    /// user and storing their secret), so their username and e-mail can be used again.
    pub async fn forget_abandoned(&self) -> Result<(), UserError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Cluster(api) => api.forget_abandoned().await,
        }
    }

    /// With a cluster, a stream that yields whenever a User or an AcceptableUsePolicy changes
    /// (on any head, or by kubectl), so access is checked again at once; None when standalone.
    pub fn changes(&self) -> Option<futures_util::stream::BoxStream<'static, ()>> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Cluster(api) => Some(api.changes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(username: &str, email: &str) -> Registration {
        Registration {
            username: username.into(),
            email: email.into(),
            full_name: "Ada Lovelace".into(),
        }
    }

    async fn users(auto_approve: bool) -> (tempfile::TempDir, Users) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let policy = Policy {
            auto_approve,
            aup_validity: Duration::from_secs(3600),
            reserved: Vec::new(),
        };
        (dir, Users::open(store, policy).await.unwrap())
    }

    #[test]
    fn registrations_are_validated_field_by_field() {
        let field = |r: Registration| r.validate(&[]).unwrap_err().field().unwrap().to_string();
        assert_eq!(field(registration("Ada", "a@b.org")), "username");
        assert_eq!(field(registration("ada", "a@b")), "email");
        assert_eq!(field(registration("ada", "a b@c.org")), "email");
        let mut nameless = registration("ada", "a@b.org");
        nameless.full_name = " ".into();
        assert_eq!(field(nameless), "fullName");
        assert!(registration("ada", "ada@example.org").validate(&[]).is_ok());
        assert_eq!(
            field(registration("kube-system", "k@example.org")),
            "username"
        );
        assert_eq!(field(registration("default", "d@example.org")), "username");
        let ops = ["ops".to_string()];
        assert!(registration("ops", "o@example.org").validate(&ops).is_err());
    }

    #[tokio::test]
    async fn duplicates_are_refused_and_secrets_checked_in_constant_time() {
        let (_dir, users) = users(false).await;
        let (user, secret) = users
            .register(registration("ada", "ada@example.org"))
            .await
            .unwrap();
        assert_eq!(user.status, Status::Pending);
        let dup = users.register(registration("ada", "x@example.org")).await;
        assert!(matches!(
            dup,
            Err(UserError::Duplicate { field: "username" })
        ));
        let dup = users.register(registration("bob", "ADA@example.org")).await;
        assert!(matches!(dup, Err(UserError::Duplicate { field: "email" })));
        assert!(users.authenticate("ada", &secret).await.is_ok());
        assert!(matches!(
            users.authenticate("ada", "wrong").await,
            Err(UserError::Unauthorized)
        ));
        assert!(matches!(
            users.authenticate("nobody", &secret).await,
            Err(UserError::Unauthorized)
        ));
    }

    #[tokio::test]
    async fn a_new_aup_version_must_be_accepted_again() {
        let (_dir, users) = users(true).await;
        users
            .register(registration("ada", "ada@example.org"))
            .await
            .unwrap();
        let v1 = users.aup().await.unwrap().version;
        assert!(users.accept("ada", v1).await.unwrap().may_use_cluster());
        let v2 = users.set_aup("Be nice.".into(), "root").await.unwrap();
        assert_eq!(v2.version, v1 + 1);
        assert!(!users.get("ada").await.unwrap().aup.valid);
        assert!(matches!(
            users.accept("ada", v1).await,
            Err(UserError::Invalid { .. })
        ));
        assert!(users.accept("ada", v2.version).await.unwrap().aup.valid);
        let revoked = users.decide("ada", Decision::Revoke, "root").await.unwrap();
        assert!(!revoked.may_use_cluster());
        assert!(matches!(
            users.decide("ada", Decision::Reject, "root").await,
            Err(UserError::Conflict(_))
        ));
    }

    #[test]
    fn decisions_follow_the_status_and_approving_twice_is_harmless() {
        use Decision::*;
        assert_eq!(Approve.allowed(Status::Approved), None);
        for from in [Status::Pending, Status::Rejected, Status::Revoked] {
            assert_eq!(Approve.allowed(from), Some(true));
        }
        assert_eq!(Reject.allowed(Status::Pending), Some(true));
        assert_eq!(Reject.allowed(Status::Approved), Some(false));
        assert_eq!(Revoke.allowed(Status::Approved), Some(true));
        assert_eq!(Revoke.allowed(Status::Pending), Some(false));
    }

    #[tokio::test]
    async fn access_is_recorded_only_while_the_rules_allow_it() {
        let (_dir, users) = users(false).await;
        users
            .register(registration("ada", "ada@example.org"))
            .await
            .unwrap();
        let refused = users.set_access("ada", true, "ada", "kubeconfig").await;
        assert!(matches!(refused, Err(UserError::Forbidden(_))), "pending");
        users
            .decide("ada", Decision::Approve, "root")
            .await
            .unwrap();
        let approved = users
            .decide("ada", Decision::Approve, "root")
            .await
            .unwrap();
        assert_eq!(
            approved.status,
            Status::Approved,
            "approving twice succeeds"
        );
        let v = users.aup().await.unwrap().version;
        users.accept("ada", v).await.unwrap();
        assert!(
            users
                .set_access("ada", true, "ada", "kubeconfig")
                .await
                .unwrap()
                .access
        );
        // Removing access for a user who may use the cluster (again) is not recorded.
        let kept = users
            .set_access("ada", false, "system", "stale")
            .await
            .unwrap();
        assert!(kept.access);
        users.decide("ada", Decision::Revoke, "root").await.unwrap();
        let removed = users
            .set_access("ada", false, "system", "revoked")
            .await
            .unwrap();
        assert!(!removed.access);
    }

    #[tokio::test]
    async fn a_change_is_written_only_onto_the_state_it_was_decided_on() {
        let (_dir, users) = users(false).await;
        users
            .register(registration("ada", "ada@example.org"))
            .await
            .unwrap();
        let (stale, _) = users.load("ada").await.unwrap().unwrap();
        users.decide("ada", Decision::Reject, "root").await.unwrap();
        let note = Note::new("root", Action::Decide(Status::Approved), "");
        let applied = users
            .backend
            .update(&stale, &Change::Status(Status::Approved), &note)
            .await
            .unwrap();
        assert!(!applied, "the user was rejected meanwhile");
        assert_eq!(users.get("ada").await.unwrap().status, Status::Rejected);
        assert!(users.load("../ada").await.unwrap().is_none());
    }
}
