//! People who use the cluster through the head: registration, approval, the Acceptable Use
//! Policy and its expiry, and who currently has cluster access. Kept in SQLite; every change is
//! logged and written to the audit table with its actor.

use crate::store::{Store, StoreError};
use crate::transport::tls::random_bytes;
use k8s_openapi::jiff::Timestamp;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tracing::info;

/// The policy shown until an administrator sets one with `edgesync aup set -f FILE`.
pub const DEFAULT_AUP: &str = include_str!("default-aup.txt");
/// How long an acceptance of the AUP lasts unless configured.
pub const DEFAULT_AUP_VALIDITY: Duration = Duration::from_secs(183 * 24 * 3600);

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

/// Status of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Registered, waiting for an administrator.
    Pending,
    /// May use the cluster once the AUP is accepted.
    Approved,
    /// Refused by an administrator.
    Rejected,
    /// Access withdrawn by an administrator.
    Revoked,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "Pending",
            Status::Approved => "Approved",
            Status::Rejected => "Rejected",
            Status::Revoked => "Revoked",
        }
    }

    fn parse(text: &str) -> Status {
        match text {
            "Approved" => Status::Approved,
            "Rejected" => Status::Rejected,
            "Revoked" => Status::Revoked,
            _ => Status::Pending,
        }
    }
}

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
        crate::input::check_label(&self.username).map_err(|r| UserError::invalid("username", r))?;
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
    let bad = || UserError::invalid("email", "is not an e-mail address like name@example.org");
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    let labels_ok = domain
        .split('.')
        .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    if local.is_empty() || local.contains('@') || !domain.contains('.') || !labels_ok {
        return Err(bad());
    }
    Ok(())
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
}

impl User {
    /// Whether the user may hold cluster credentials now.
    pub fn may_use_cluster(&self) -> bool {
        self.status == Status::Approved && self.aup.valid
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

/// The user registry.
#[derive(Clone)]
pub struct Users {
    store: Store,
    policy: Policy,
}

fn unix_now() -> i64 {
    Timestamp::now().as_second()
}

fn rfc3339(unix: Option<i64>) -> Option<String> {
    unix.and_then(|s| Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Raw row of the users table.
struct Row {
    username: String,
    uid: String,
    email: String,
    full_name: String,
    secret: Vec<u8>,
    status: String,
    aup_version: Option<i64>,
    aup_accepted_at: Option<i64>,
    aup_expires_at: Option<i64>,
    access: bool,
}

const COLUMNS: &str = "username, email, full_name, secret_sha256, status, aup_version, \
                       aup_accepted_at, aup_expires_at, access, uid";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        username: r.get(0)?,
        email: r.get(1)?,
        full_name: r.get(2)?,
        secret: r.get(3)?,
        status: r.get(4)?,
        aup_version: r.get(5)?,
        aup_accepted_at: r.get(6)?,
        aup_expires_at: r.get(7)?,
        access: r.get(8)?,
        uid: r.get(9)?,
    })
}

fn audit(
    t: &rusqlite::Connection,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> rusqlite::Result<()> {
    t.execute(
        "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![unix_now(), actor, action, subject, detail],
    )?;
    info!(%actor, %action, %subject, %detail, "user registry changed");
    Ok(())
}

impl Users {
    /// The registry in `store`; puts the embedded AUP in place if none was ever set.
    pub async fn open(store: Store, policy: Policy) -> Result<Users, StoreError> {
        store
            .call(|t| {
                let none: bool = t.query_row("SELECT COUNT(*) = 0 FROM aups", [], |r| r.get(0))?;
                if none {
                    t.execute(
                        "INSERT INTO aups (text, created_at) VALUES (?1, ?2)",
                        params![DEFAULT_AUP, unix_now()],
                    )?;
                }
                Ok(())
            })
            .await?;
        Ok(Users { store, policy })
    }

    /// The current AUP.
    pub async fn aup(&self) -> Result<Aup, StoreError> {
        self.store
            .call(|t| {
                t.query_row(
                    "SELECT version, text FROM aups ORDER BY version DESC LIMIT 1",
                    [],
                    |r| {
                        Ok(Aup {
                            version: r.get(0)?,
                            text: r.get(1)?,
                        })
                    },
                )
            })
            .await
    }

    /// Publishes a new AUP version; users must accept it again.
    pub async fn set_aup(&self, text: String, actor: &str) -> Result<Aup, UserError> {
        if text.trim().is_empty() {
            return Err(UserError::invalid("text", "the policy text is empty"));
        }
        let actor = actor.to_string();
        let version = self
            .store
            .call(move |t| {
                t.execute(
                    "INSERT INTO aups (text, created_at) VALUES (?1, ?2)",
                    params![text, unix_now()],
                )?;
                let version = t.last_insert_rowid();
                audit(t, &actor, "aup-set", "aup", &format!("version {version}"))?;
                Ok(version)
            })
            .await?;
        let aup = self.aup().await?;
        debug_assert_eq!(aup.version, version);
        Ok(aup)
    }

    fn user(&self, row: Row, current: i64, now: i64) -> User {
        let valid = row.aup_version == Some(current) && row.aup_expires_at.is_some_and(|e| e > now);
        User {
            username: row.username,
            uid: row.uid,
            email: row.email,
            full_name: row.full_name,
            status: Status::parse(&row.status),
            aup: Acceptance {
                version: row.aup_version,
                accepted_at: rfc3339(row.aup_accepted_at),
                expires_at: rfc3339(row.aup_expires_at),
                valid,
            },
            access: row.access,
        }
    }

    async fn find(&self, username: &str) -> Result<Option<(Row, i64)>, StoreError> {
        let username = username.to_string();
        self.store
            .call(move |t| {
                let current: i64 =
                    t.query_row("SELECT MAX(version) FROM aups", [], |r| r.get(0))?;
                let found = t
                    .query_row(
                        &format!("SELECT {COLUMNS} FROM users WHERE username = ?1"),
                        [username],
                        row,
                    )
                    .optional()?;
                Ok(found.map(|r| (r, current)))
            })
            .await
    }

    /// Registers a person; returns them and their secret (shown once, stored only hashed).
    pub async fn register(&self, request: Registration) -> Result<(User, String), UserError> {
        request.validate(&self.policy.reserved)?;
        let secret = hex::encode(random_bytes::<32>());
        let uid = hex::encode(random_bytes::<16>());
        let status = if self.policy.auto_approve {
            Status::Approved
        } else {
            Status::Pending
        };
        let (username, email, full_name) = (
            request.username.clone(),
            request.email.clone(),
            request.full_name.trim().to_string(),
        );
        let secret_hash = hash(&secret);
        let taken = self
            .store
            .call(move |t| {
                let field = t
                    .query_row(
                        "SELECT CASE WHEN username = ?1 THEN 'username' ELSE 'email' END
                         FROM users WHERE username = ?1 OR email = ?2 COLLATE NOCASE",
                        params![username, email],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()?;
                if field.is_some() {
                    return Ok(field);
                }
                t.execute(
                    "INSERT INTO users (username, uid, email, full_name, secret_sha256, status, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![username, uid, email, full_name, secret_hash, status.as_str(), unix_now()],
                )?;
                audit(t, &username, "register", &username, status.as_str())?;
                if status == Status::Approved {
                    audit(t, "policy:auto-approve", "approve", &username, "")?;
                }
                Ok(None)
            })
            .await?;
        match taken.as_deref() {
            Some("username") => return Err(UserError::Duplicate { field: "username" }),
            Some(_) => return Err(UserError::Duplicate { field: "email" }),
            None => {}
        }
        let user = self.get(&request.username).await?;
        Ok((user, secret))
    }

    /// The user `username` (administrators).
    pub async fn get(&self, username: &str) -> Result<User, UserError> {
        let (row, current) = self
            .find(username)
            .await?
            .ok_or_else(|| UserError::NotFound(username.to_string()))?;
        Ok(self.user(row, current, unix_now()))
    }

    /// The user `username` if `secret` is theirs; otherwise Unauthorized, whether or not the
    /// user exists, after the same work.
    pub async fn authenticate(&self, username: &str, secret: &str) -> Result<User, UserError> {
        let found = self.find(username).await?;
        let presented = hash(secret);
        let stored = found
            .as_ref()
            .map_or([0u8; 32].as_slice(), |(r, _)| &r.secret);
        let matches: bool = subtle::ConstantTimeEq::ct_eq(presented.as_slice(), stored).into();
        match found {
            Some((row, current)) if matches => Ok(self.user(row, current, unix_now())),
            _ => Err(UserError::Unauthorized),
        }
    }

    /// Records that the user accepted AUP `version` (which must be the current one).
    pub async fn accept(&self, username: &str, version: i64) -> Result<User, UserError> {
        let user = self.get(username).await?;
        if matches!(user.status, Status::Rejected | Status::Revoked) {
            return Err(UserError::Forbidden(format!(
                "user {username} is {}",
                user.status.as_str()
            )));
        }
        let current = self.aup().await?.version;
        if version != current {
            return Err(UserError::invalid(
                "version",
                format!("the current AUP is version {current}; read it with GET /api/v1/aup"),
            ));
        }
        let validity = i64::try_from(self.policy.aup_validity.as_secs()).unwrap_or(i64::MAX);
        let name = username.to_string();
        self.store
            .call(move |t| {
                let now = unix_now();
                let expires = now.saturating_add(validity);
                t.execute(
                    "UPDATE users SET aup_version = ?2, aup_accepted_at = ?3, aup_expires_at = ?4
                     WHERE username = ?1",
                    params![name, version, now, expires],
                )?;
                audit(t, &name, "aup-accept", &name, &format!("version {version}"))
            })
            .await?;
        self.get(username).await
    }

    /// An administrator's decision about `username`.
    pub async fn decide(
        &self,
        username: &str,
        decision: Decision,
        actor: &str,
    ) -> Result<User, UserError> {
        let user = self.get(username).await?;
        let allowed = match decision {
            Decision::Approve => user.status != Status::Approved,
            Decision::Reject => user.status == Status::Pending,
            Decision::Revoke => user.status == Status::Approved,
        };
        if !allowed {
            return Err(UserError::Conflict(format!(
                "user {username} is {}; cannot {}",
                user.status.as_str(),
                format!("{decision:?}").to_lowercase()
            )));
        }
        let (name, actor, status) = (
            username.to_string(),
            actor.to_string(),
            decision.status().as_str(),
        );
        self.store
            .call(move |t| {
                t.execute(
                    "UPDATE users SET status = ?2 WHERE username = ?1",
                    params![name, status],
                )?;
                audit(t, &actor, &status.to_lowercase(), &name, "")
            })
            .await?;
        self.get(username).await
    }

    /// Every user, by name.
    pub async fn list(&self) -> Result<Vec<User>, StoreError> {
        let (rows, current) = self
            .store
            .call(|t| {
                let current: i64 =
                    t.query_row("SELECT MAX(version) FROM aups", [], |r| r.get(0))?;
                let mut query =
                    t.prepare(&format!("SELECT {COLUMNS} FROM users ORDER BY username"))?;
                let rows = query.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
                Ok((rows, current))
            })
            .await?;
        let now = unix_now();
        Ok(rows
            .into_iter()
            .map(|r| self.user(r, current, now))
            .collect())
    }

    /// Records whether the user's cluster access (RoleBinding) exists, with the reason.
    pub async fn set_access(
        &self,
        username: &str,
        access: bool,
        actor: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let (name, actor, reason) = (username.to_string(), actor.to_string(), reason.to_string());
        self.store
            .call(move |t| {
                t.execute(
                    "UPDATE users SET access = ?2 WHERE username = ?1",
                    params![name, access],
                )?;
                let action = if access {
                    "access-granted"
                } else {
                    "access-removed"
                };
                audit(t, &actor, action, &name, &reason)
            })
            .await
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
}
