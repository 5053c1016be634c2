//! The users tables of a standalone head: `users`, `aups` and `audit`. A change is written only
//! if the row still holds what its rule was checked on, with its audit rows in the same
//! transaction.

use super::{Store, StoreError};
use crate::clock::unix_now;
use rusqlite::{Connection, OptionalExtension, params};

/// A user's row.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRow {
    /// Username.
    pub username: String,
    /// Numeric id, as text.
    pub uid: String,
    /// E-mail address.
    pub email: String,
    /// Full name.
    pub full_name: String,
    /// SHA-256 of the sign-in secret.
    pub secret_sha256: Vec<u8>,
    /// Pending, Approved, Rejected or Revoked.
    pub status: String,
    /// The AUP version accepted last.
    pub aup_version: Option<i64>,
    /// When (unix seconds).
    pub aup_accepted_at: Option<i64>,
    /// Until when (unix seconds).
    pub aup_expires_at: Option<i64>,
    /// Whether the user's cluster access exists.
    pub access: bool,
    /// When they last signed out of the portal (unix seconds).
    pub signed_out_at: Option<i64>,
}

/// One change to a user's row.
#[derive(Debug, Clone, PartialEq)]
pub enum UserUpdate {
    /// A new status.
    Status(String),
    /// An acceptance of AUP `version`, at and until unix times.
    Accept {
        /// AUP version.
        version: i64,
        /// Accepted at.
        accepted_at: i64,
        /// Valid until.
        expires_at: i64,
    },
    /// Whether the cluster access exists.
    Access(bool),
    /// Signed out at this unix time: their portal sessions end.
    SignOut(i64),
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Who.
    pub actor: String,
    /// What (`register`, `approve`, `aup-accept`, …).
    pub action: String,
    /// More about it.
    pub detail: String,
}

/// One line of the audit trail as read back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditRow {
    /// When (RFC 3339).
    pub at: String,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To whom (a username, or `aup`).
    pub subject: String,
    /// More about it.
    pub detail: String,
}

/// One version of the Acceptable Use Policy.
#[derive(Debug, Clone, PartialEq)]
pub struct AupRow {
    /// Version, increasing.
    pub version: i64,
    /// Text.
    pub text: String,
}

const COLUMNS: &str = "username, email, full_name, secret_sha256, status, aup_version, \
                       aup_accepted_at, aup_expires_at, access, uid, signed_out_at";

fn user(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        username: r.get(0)?,
        email: r.get(1)?,
        full_name: r.get(2)?,
        secret_sha256: r.get(3)?,
        status: r.get(4)?,
        aup_version: r.get(5)?,
        aup_accepted_at: r.get(6)?,
        aup_expires_at: r.get(7)?,
        access: r.get(8)?,
        uid: r.get(9)?,
        signed_out_at: r.get(10)?,
    })
}

fn audit(t: &Connection, subject: &str, entry: &AuditEntry) -> rusqlite::Result<()> {
    t.execute(
        "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![unix_now(), entry.actor, entry.action, subject, entry.detail],
    )?;
    Ok(())
}

fn current(t: &Connection) -> rusqlite::Result<AupRow> {
    t.query_row(
        "SELECT version, text FROM aups ORDER BY version DESC LIMIT 1",
        [],
        |r| {
            Ok(AupRow {
                version: r.get(0)?,
                text: r.get(1)?,
            })
        },
    )
}

impl Store {
    /// Puts `default_aup` in place as the first AUP if none was ever set.
    pub async fn init_aup(&self, default_aup: &'static str) -> Result<(), StoreError> {
        self.call(move |t| {
            let none: bool = t.query_row("SELECT COUNT(*) = 0 FROM aups", [], |r| r.get(0))?;
            if none {
                t.execute(
                    "INSERT INTO aups (text, created_at) VALUES (?1, ?2)",
                    params![default_aup, unix_now()],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The audit trail since `since` (unix seconds), oldest first, at most `limit` lines (the
    /// newest).
    pub async fn audit(&self, since: i64, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        self.call(move |t| {
            let mut query = t.prepare(
                "SELECT at, actor, action, subject, detail FROM audit WHERE at >= ?1
                 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = query.query_map(params![since, limit as i64], |r| {
                let at: i64 = r.get(0)?;
                Ok(AuditRow {
                    at: k8s_openapi::jiff::Timestamp::from_second(at)
                        .map_or_else(|_| at.to_string(), |t| t.to_string()),
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    subject: r.get(3)?,
                    detail: r.get(4)?,
                })
            })?;
            let mut rows = rows.collect::<Result<Vec<_>, _>>()?;
            rows.reverse();
            Ok(rows)
        })
        .await
    }

    /// The current AUP.
    pub async fn aup(&self) -> Result<AupRow, StoreError> {
        self.call(current).await
    }

    /// Stores `text` as the next AUP version; the audit entry's detail names the version.
    pub async fn publish_aup(&self, text: String, by: AuditEntry) -> Result<AupRow, StoreError> {
        self.call(move |t| {
            t.execute(
                "INSERT INTO aups (text, created_at) VALUES (?1, ?2)",
                params![text, unix_now()],
            )?;
            let version = t.last_insert_rowid();
            let entry = AuditEntry {
                detail: format!("version {version}"),
                ..by
            };
            audit(t, "aup", &entry)?;
            current(t)
        })
        .await
    }

    /// The user `username`.
    pub async fn user(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let username = username.to_string();
        self.call(move |t| {
            t.query_row(
                &format!("SELECT {COLUMNS} FROM users WHERE username = ?1"),
                [username],
                user,
            )
            .optional()
        })
        .await
    }

    /// Every user.
    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.call(|t| {
            let mut query = t.prepare(&format!("SELECT {COLUMNS} FROM users ORDER BY username"))?;
            let rows = query.query_map([], user)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Stores a new user unless the username or e-mail is taken; then returns which.
    pub async fn insert_user(
        &self,
        row: UserRow,
        entries: Vec<AuditEntry>,
    ) -> Result<Option<&'static str>, StoreError> {
        self.call(move |t| {
            let taken = t
                .query_row(
                    "SELECT username = ?1 AS same FROM users WHERE username = ?1 OR email = ?2 COLLATE NOCASE
                     ORDER BY same DESC LIMIT 1",
                    params![row.username, row.email],
                    |r| r.get::<_, bool>(0),
                )
                .optional()?;
            if let Some(same_name) = taken {
                return Ok(Some(if same_name { "username" } else { "email" }));
            }
            t.execute(
                "INSERT INTO users (username, uid, email, full_name, secret_sha256, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    row.username,
                    row.uid,
                    row.email,
                    row.full_name,
                    row.secret_sha256,
                    row.status,
                    unix_now()
                ],
            )?;
            for entry in &entries {
                audit(t, &row.username, entry)?;
            }
            Ok(None)
        })
        .await
    }

    /// Applies `update` if the row still holds what `old` read; false if it changed.
    pub async fn update_user(
        &self,
        old: UserRow,
        update: UserUpdate,
        entry: AuditEntry,
    ) -> Result<bool, StoreError> {
        use rusqlite::types::Value;
        let (set, new): (&str, Vec<Value>) = match update {
            UserUpdate::Status(status) => ("status = ?7", vec![status.into()]),
            UserUpdate::Accept {
                version,
                accepted_at,
                expires_at,
            } => (
                "aup_version = ?7, aup_accepted_at = ?8, aup_expires_at = ?9",
                vec![version.into(), accepted_at.into(), expires_at.into()],
            ),
            UserUpdate::Access(access) => ("access = ?7", vec![access.into()]),
            UserUpdate::SignOut(at) => ("signed_out_at = ?7", vec![at.into()]),
        };
        let was: Vec<Value> = vec![
            old.username.clone().into(),
            old.status.into(),
            old.aup_version.into(),
            old.aup_accepted_at.into(),
            old.aup_expires_at.into(),
            old.access.into(),
        ];
        let sql = format!(
            "UPDATE users SET {set} WHERE username = ?1 AND status = ?2 AND aup_version IS ?3
             AND aup_accepted_at IS ?4 AND aup_expires_at IS ?5 AND access = ?6"
        );
        self.call(move |t| {
            let changed =
                t.execute(&sql, rusqlite::params_from_iter(was.into_iter().chain(new)))?;
            if changed == 1 {
                audit(t, &old.username, &entry)?;
            }
            Ok(changed == 1)
        })
        .await
    }
}
