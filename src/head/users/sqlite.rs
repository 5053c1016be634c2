//! Users of a standalone head, kept in its SQLite database through the store's typed user
//! operations: records, changes and notes turned into rows and back.

use super::{Aup, Change, DEFAULT_AUP, Note, Record, Status};
use crate::store::users::{AuditEntry, AuditRow, AupRow, UserRow, UserUpdate};
use crate::store::{Store, StoreError};

/// The users tables of one head's database.
#[derive(Clone)]
pub struct Sqlite {
    store: Store,
}

fn record(row: UserRow) -> Record {
    Record {
        username: row.username,
        uid: row.uid,
        email: row.email,
        full_name: row.full_name,
        secret: row.secret_sha256,
        status: Status::parse(&row.status),
        aup_version: row.aup_version,
        aup_accepted_at: row.aup_accepted_at,
        aup_expires_at: row.aup_expires_at,
        access: row.access,
        signed_out_at: row.signed_out_at,
        revision: String::new(),
    }
}

fn row(record: Record) -> UserRow {
    UserRow {
        username: record.username,
        uid: record.uid,
        email: record.email,
        full_name: record.full_name,
        secret_sha256: record.secret,
        status: record.status.as_str().to_string(),
        aup_version: record.aup_version,
        aup_accepted_at: record.aup_accepted_at,
        aup_expires_at: record.aup_expires_at,
        access: record.access,
        signed_out_at: record.signed_out_at,
    }
}

fn entry(note: Note) -> AuditEntry {
    AuditEntry {
        actor: note.actor,
        action: note.action.audit(),
        detail: note.detail,
    }
}

fn aup(row: AupRow) -> Aup {
    Aup {
        version: row.version,
        text: row.text,
    }
}

impl Sqlite {
    /// The tables in `store`, with the embedded AUP in place if none was ever set.
    pub async fn open(store: Store) -> Result<Sqlite, StoreError> {
        store.init_aup(DEFAULT_AUP).await?;
        Ok(Sqlite { store })
    }

    /// The audit trail since `since` (unix seconds), at most `limit` lines.
    pub(super) async fn audit(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.store.audit(since, limit).await
    }

    /// The current AUP.
    pub(super) async fn aup(&self) -> Result<Aup, StoreError> {
        Ok(aup(self.store.aup().await?))
    }

    /// Stores `text` as the next AUP version.
    pub(super) async fn publish(&self, text: String, note: Note) -> Result<Aup, StoreError> {
        Ok(aup(self.store.publish_aup(text, entry(note)).await?))
    }

    /// The user `username`.
    pub(super) async fn find(&self, username: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.store.user(username).await?.map(record))
    }

    /// Every user.
    pub(super) async fn list(&self) -> Result<Vec<Record>, StoreError> {
        Ok(self.store.users().await?.into_iter().map(record).collect())
    }

    /// Stores a new user unless the username or e-mail is taken; then returns which.
    pub(super) async fn insert(
        &self,
        record: Record,
        notes: Vec<Note>,
    ) -> Result<Option<&'static str>, StoreError> {
        let entries = notes.into_iter().map(entry).collect();
        self.store.insert_user(row(record), entries).await
    }

    /// Applies `change` if the row still holds what `old` read; false if it changed.
    pub(super) async fn update(
        &self,
        old: Record,
        change: Change,
        note: Note,
    ) -> Result<bool, StoreError> {
        let update = match change {
            Change::Status(status) => UserUpdate::Status(status.as_str().to_string()),
            Change::Accept {
                version,
                accepted_at,
                expires_at,
            } => UserUpdate::Accept {
                version,
                accepted_at,
                expires_at,
            },
            Change::Access(access) => UserUpdate::Access(access),
            Change::SignOut(at) => UserUpdate::SignOut(at),
        };
        self.store.update_user(row(old), update, entry(note)).await
    }
}
