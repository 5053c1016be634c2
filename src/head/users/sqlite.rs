//! Users of a standalone head in its SQLite database: the `users`, `aups` and `audit` tables.
//! One writer thread runs every statement, and a change is written only if the row still holds
//! what its rule was checked on, with its audit row in the same transaction.

use super::{Aup, Change, DEFAULT_AUP, Note, Record, Status};
use crate::clock::unix_now;
use crate::store::{Store, StoreError};
use rusqlite::{Connection, OptionalExtension, params};

/// The users tables of one head's database.
#[derive(Clone)]
pub struct Sqlite {
    store: Store,
}

const COLUMNS: &str = "username, email, full_name, secret_sha256, status, aup_version, \
                       aup_accepted_at, aup_expires_at, access, uid";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        username: r.get(0)?,
        email: r.get(1)?,
        full_name: r.get(2)?,
        secret: r.get(3)?,
        status: Status::parse(&r.get::<_, String>(4)?),
        aup_version: r.get(5)?,
        aup_accepted_at: r.get(6)?,
        aup_expires_at: r.get(7)?,
        access: r.get(8)?,
        uid: r.get(9)?,
        revision: String::new(),
    })
}

fn audit(t: &Connection, subject: &str, note: &Note) -> rusqlite::Result<()> {
    t.execute(
        "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            unix_now(),
            note.actor,
            note.action.audit(),
            subject,
            note.detail
        ],
    )?;
    Ok(())
}

fn current(t: &Connection) -> rusqlite::Result<Aup> {
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
}

impl Sqlite {
    /// The tables in `store`, with the embedded AUP in place if none was ever set.
    pub async fn open(store: Store) -> Result<Sqlite, StoreError> {
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
        Ok(Sqlite { store })
    }

    /// The current AUP.
    pub(super) async fn aup(&self) -> Result<Aup, StoreError> {
        self.store.call(current).await
    }

    /// Stores `text` as the next AUP version.
    pub(super) async fn publish(&self, text: String, note: Note) -> Result<Aup, StoreError> {
        self.store
            .call(move |t| {
                t.execute(
                    "INSERT INTO aups (text, created_at) VALUES (?1, ?2)",
                    params![text, unix_now()],
                )?;
                let version = t.last_insert_rowid();
                let note = Note {
                    detail: format!("version {version}"),
                    ..note
                };
                audit(t, "aup", &note)?;
                current(t)
            })
            .await
    }

    /// The user `username`.
    pub(super) async fn find(&self, username: &str) -> Result<Option<Record>, StoreError> {
        let username = username.to_string();
        self.store
            .call(move |t| {
                t.query_row(
                    &format!("SELECT {COLUMNS} FROM users WHERE username = ?1"),
                    [username],
                    row,
                )
                .optional()
            })
            .await
    }

    /// Every user.
    pub(super) async fn list(&self) -> Result<Vec<Record>, StoreError> {
        self.store
            .call(|t| {
                let mut query =
                    t.prepare(&format!("SELECT {COLUMNS} FROM users ORDER BY username"))?;
                let rows = query.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    /// Stores a new user unless the username or e-mail is taken; then returns which.
    pub(super) async fn insert(
        &self,
        record: Record,
        notes: Vec<Note>,
    ) -> Result<Option<&'static str>, StoreError> {
        self.store
            .call(move |t| {
                let taken = t
                    .query_row(
                        "SELECT username = ?1 AS same FROM users WHERE username = ?1 OR email = ?2 COLLATE NOCASE
                         ORDER BY same DESC LIMIT 1",
                        params![record.username, record.email],
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
                        record.username,
                        record.uid,
                        record.email,
                        record.full_name,
                        record.secret,
                        record.status.as_str(),
                        unix_now()
                    ],
                )?;
                for note in &notes {
                    audit(t, &record.username, note)?;
                }
                Ok(None)
            })
            .await
    }

    /// Applies `change` if the row still holds what `old` read; false if it changed.
    pub(super) async fn update(
        &self,
        old: Record,
        change: Change,
        note: Note,
    ) -> Result<bool, StoreError> {
        use rusqlite::types::Value;
        let (set, new): (&str, Vec<Value>) = match change {
            Change::Status(status) => ("status = ?7", vec![status.as_str().to_string().into()]),
            Change::Accept {
                version,
                accepted_at,
                expires_at,
            } => (
                "aup_version = ?7, aup_accepted_at = ?8, aup_expires_at = ?9",
                vec![version.into(), accepted_at.into(), expires_at.into()],
            ),
            Change::Access(access) => ("access = ?7", vec![access.into()]),
        };
        let was: Vec<Value> = vec![
            old.username.clone().into(),
            old.status.as_str().to_string().into(),
            old.aup_version.into(),
            old.aup_accepted_at.into(),
            old.aup_expires_at.into(),
            old.access.into(),
        ];
        let sql = format!(
            "UPDATE users SET {set} WHERE username = ?1 AND status = ?2 AND aup_version IS ?3
             AND aup_accepted_at IS ?4 AND aup_expires_at IS ?5 AND access = ?6"
        );
        self.store
            .call(move |t| {
                let changed =
                    t.execute(&sql, rusqlite::params_from_iter(was.into_iter().chain(new)))?;
                if changed == 1 {
                    audit(t, &old.username, &note)?;
                }
                Ok(changed == 1)
            })
            .await
    }
}
