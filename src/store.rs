//! SQLite state: open and migrate, one writer thread with batched transactions, documents,
//! per-peer sync state, owned manifest files, join tokens and joined nodes.

pub mod users;

use prometheus_client::metrics::histogram::Histogram;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// Schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
/// Incremental chunks kept per document before it is compacted into one snapshot.
pub const COMPACT_AFTER_CHUNKS: usize = 64;

const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
     CREATE TABLE docs (key TEXT PRIMARY KEY, snapshot BLOB NOT NULL, last_synced_at TEXT);
     CREATE TABLE doc_chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, data BLOB NOT NULL);
     CREATE INDEX doc_chunks_key ON doc_chunks (key, id);
     CREATE TABLE sync_states (peer TEXT NOT NULL, key TEXT NOT NULL, state BLOB NOT NULL, PRIMARY KEY (peer, key));
     CREATE TABLE manifests (file TEXT PRIMARY KEY, key TEXT NOT NULL, pod TEXT NOT NULL, sha256 TEXT NOT NULL);
     CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_sha256 BLOB NOT NULL, expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL);
     CREATE TABLE nodes (name TEXT PRIMARY KEY, key_sha256 BLOB NOT NULL, cert_not_after INTEGER NOT NULL, joined_at INTEGER NOT NULL, address TEXT, last_seen INTEGER);",
    // 2: users of the head API, the Acceptable Use Policy, and the audit log
    "CREATE TABLE users (username TEXT PRIMARY KEY, uid TEXT NOT NULL, email TEXT NOT NULL UNIQUE COLLATE NOCASE,
         full_name TEXT NOT NULL, secret_sha256 BLOB NOT NULL, status TEXT NOT NULL,
         created_at INTEGER NOT NULL, aup_version INTEGER, aup_accepted_at INTEGER,
         aup_expires_at INTEGER, access INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE aups (version INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, created_at INTEGER NOT NULL);
     CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, actor TEXT NOT NULL,
         action TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');",
    // 3: when each user last signed out of the portal (sessions issued before end)
    "ALTER TABLE users ADD COLUMN signed_out_at INTEGER;",
    // 4: an owned manifest's digest was never read (what is on disk is compared with what is
    // wanted); keeping it cost a commit after every manifest write
    "ALTER TABLE manifests DROP COLUMN sha256;",
    // 5: a document's chunks and the sync states each in one b-tree keyed as they are read
    // (no rowid, no AUTOINCREMENT counter): writing either touches one b-tree instead of
    // two (a chunk also updated the counter's)
    "CREATE TABLE doc_chunks_by_key (key TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
         PRIMARY KEY (key, seq)) WITHOUT ROWID;
     INSERT INTO doc_chunks_by_key (key, seq, data) SELECT key, id, data FROM doc_chunks;
     DROP TABLE doc_chunks;
     ALTER TABLE doc_chunks_by_key RENAME TO doc_chunks;
     CREATE TABLE sync_states_by_key (peer TEXT NOT NULL, key TEXT NOT NULL, state BLOB NOT NULL,
         PRIMARY KEY (peer, key)) WITHOUT ROWID;
     INSERT INTO sync_states_by_key (peer, key, state) SELECT peer, key, state FROM sync_states;
     DROP TABLE sync_states;
     ALTER TABLE sync_states_by_key RENAME TO sync_states;",
];

/// Errors from the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database {path}: {source}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer edgesync.
    #[error(
        "database {path} has schema version {found}, newer than this edgesync knows ({known}); upgrade edgesync or point --state-dir elsewhere"
    )]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version found.
        found: i64,
        /// Version known.
        known: i64,
    },
    /// The database failed its integrity check.
    #[error(
        "database {path} is corrupt ({detail}); restore it from a backup or move it away to start empty"
    )]
    Corrupt {
        /// Database file.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// The writer thread is gone (the node is shutting down).
    #[error("database writer has stopped")]
    Closed,
}

/// Told, after the batch's commit, whether the commit failed.
type Reply = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;
/// Runs inside the batch's transaction; says whether it succeeded and how to reply.
type Job = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// Handle to the database; cheap to clone. All access goes through one writer thread,
/// which runs whatever is queued in one transaction (each job in its own savepoint).
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::UnboundedSender<Job>,
    path: PathBuf,
    write_seconds: Histogram,
}

/// A stored document: its snapshot and the incremental chunks saved after it.
#[derive(Debug, Clone)]
pub struct StoredDoc {
    /// Document key.
    pub key: String,
    /// `Automerge::save()` output.
    pub snapshot: Vec<u8>,
    /// `save_incremental()` outputs since, in order.
    pub chunks: Vec<Vec<u8>>,
    /// When a peer last synced it (RFC 3339).
    pub last_synced_at: Option<String>,
}

/// What to store for a document.
#[derive(Debug)]
pub enum DocWrite {
    /// `save_incremental()` output, appended after the snapshot.
    Chunk(Vec<u8>),
    /// `save()` output, replacing the snapshot and every chunk.
    Snapshot(Vec<u8>),
}

/// One document's write: what changed, the sync states to keep with it, and when a peer
/// last synced it.
#[derive(Debug)]
pub struct DocSave {
    /// Document key.
    pub key: String,
    /// The document's bytes.
    pub write: DocWrite,
    /// Sync states by peer.
    pub sync_states: Vec<(String, Vec<u8>)>,
    /// When a peer last synced it (RFC 3339), if that changed.
    pub synced_at: Option<String>,
}

/// A manifest file edgesync wrote and owns (recorded before it is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFile {
    /// File name inside the manifest dir.
    pub file: String,
    /// Document key it came from.
    pub key: String,
    /// Pod name.
    pub pod: String,
}

/// A node that joined this head.
#[derive(Debug, Clone)]
pub struct JoinedNode {
    /// Node name.
    pub name: String,
    /// SHA-256 of the public key of the latest certificate issued to it.
    pub key_sha256: Vec<u8>,
    /// When that certificate expires (unix seconds).
    pub cert_not_after: i64,
}

impl Store {
    /// Opens (creating if needed) `<dir>/edgesync.db`, checks it and migrates it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("edgesync.db");
        let conn = open_connection(&path)?;
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let thread_path = path.clone();
        let write_seconds = crate::metrics::sqlite_histogram();
        let timer = write_seconds.clone();
        std::thread::Builder::new()
            .name("edgesync-db".into())
            .spawn(move || writer_loop(conn, &mut queue, &thread_path, &timer))
            .map_err(|e| sqlite_err(&path, rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Store {
            jobs,
            path,
            write_seconds,
        })
    }

    /// Time each batch of writes takes to commit.
    pub fn write_seconds(&self) -> Histogram {
        self.write_seconds.clone()
    }

    /// Runs `f` on the writer thread inside a transaction and returns its result once committed.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit_error| {
                let result = match commit_error {
                    Some(e) => Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                        Some(format!("commit failed: {e}")),
                    )),
                    None => result,
                };
                let _ = tx.send(result);
            });
            (ok, reply)
        });
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(|source| sqlite_err(&self.path, source))
    }

    /// Runs `f` on the database's connection: tests look at what is stored (no other
    /// connection may open it while this one does).
    #[cfg(test)]
    pub(crate) async fn inspect<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.call(f).await
    }

    /// A value from the meta table, or `init()` stored first if absent.
    pub async fn meta_or_init(
        &self,
        key: &'static str,
        init: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        self.call(move |t| {
            t.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, init],
            )?;
            t.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        })
        .await
    }

    /// One stored document with its chunks.
    pub async fn load_doc(&self, key: String) -> Result<Option<StoredDoc>, StoreError> {
        let mut docs = self.load_where(Some(key)).await?;
        Ok(docs.pop())
    }

    /// A value from the meta table.
    pub async fn meta(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        self.call(move |t| {
            t.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Sets (or with None, removes) a value in the meta table.
    pub async fn set_meta(&self, key: String, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.call(move |t| {
            match value {
                Some(v) => t.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, v],
                )?,
                None => t.execute("DELETE FROM meta WHERE key = ?1", [key])?,
            };
            Ok(())
        })
        .await
    }

    /// Every stored document with its chunks.
    pub async fn load_docs(&self) -> Result<Vec<StoredDoc>, StoreError> {
        self.load_where(None).await
    }

    async fn load_where(&self, only: Option<String>) -> Result<Vec<StoredDoc>, StoreError> {
        self.call(move |t| {
            let mut docs = Vec::new();
            let mut stmt = t.prepare(
                "SELECT key, snapshot, last_synced_at FROM docs
                 WHERE ?1 IS NULL OR key = ?1 ORDER BY key",
            )?;
            let rows = stmt.query_map([only], |r| {
                Ok(StoredDoc {
                    key: r.get(0)?,
                    snapshot: r.get(1)?,
                    chunks: Vec::new(),
                    last_synced_at: r.get(2)?,
                })
            })?;
            for row in rows {
                docs.push(row?);
            }
            let mut chunks =
                t.prepare("SELECT data FROM doc_chunks WHERE key = ?1 ORDER BY seq")?;
            for doc in &mut docs {
                doc.chunks = chunks
                    .query_map([&doc.key], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
            }
            Ok(docs)
        })
        .await
    }

    /// Stores documents' writes (and their sync states) in one transaction.
    pub async fn save_docs(&self, saves: Vec<DocSave>) -> Result<(), StoreError> {
        self.call(move |t| {
            for save in saves {
                save_doc(t, save)?;
            }
            Ok(())
        })
        .await
    }

    /// Stores sync states with `peer`, by document key.
    pub async fn save_sync_states(
        &self,
        peer: &str,
        states: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let peer = peer.to_string();
        self.call(move |t| {
            for (key, state) in states {
                upsert_sync_state(t, &peer, &key, &state)?;
            }
            Ok(())
        })
        .await
    }

    /// Stored sync states with `peer`, by document key.
    pub async fn sync_states(&self, peer: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let peer = peer.to_string();
        self.call(move |t| {
            let mut stmt = t.prepare("SELECT key, state FROM sync_states WHERE peer = ?1")?;
            let rows = stmt.query_map([peer], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Every stored sync state: peer, document key, state.
    pub async fn all_sync_states(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        self.call(|t| {
            let mut stmt = t.prepare("SELECT peer, key, state FROM sync_states")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await
    }

    /// Manifest files edgesync owns: recorded as written, so it repairs or removes them
    /// whatever their content (but never a link or directory found in their place).
    pub async fn owned_files(&self) -> Result<Vec<OwnedFile>, StoreError> {
        self.call(|t| {
            let mut stmt = t.prepare("SELECT file, key, pod FROM manifests ORDER BY file")?;
            let rows = stmt.query_map([], |r| {
                Ok(OwnedFile {
                    file: r.get(0)?,
                    key: r.get(1)?,
                    pod: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Records that edgesync owns `file` (before writing it, so a crash never orphans it).
    pub async fn own_file(&self, file: OwnedFile) -> Result<(), StoreError> {
        self.call(move |t| {
            t.execute(
                "INSERT INTO manifests (file, key, pod) VALUES (?1, ?2, ?3)
                 ON CONFLICT (file) DO UPDATE SET key = excluded.key, pod = excluded.pod",
                params![file.file, file.key, file.pod],
            )
            .map(drop)
        })
        .await
    }

    /// Forgets `file`: after deleting it, after its first write failed, or once something that is
    /// not a regular file took its place.
    pub async fn disown_file(&self, file: String) -> Result<(), StoreError> {
        self.call(move |t| {
            t.execute("DELETE FROM manifests WHERE file = ?1", [file])
                .map(drop)
        })
        .await
    }

    /// Stores a join token (only the hash of its secret).
    pub async fn add_token(
        &self,
        id: String,
        secret_sha256: Vec<u8>,
        expires_at: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.call(move |t| {
            t.execute("DELETE FROM tokens WHERE expires_at < ?1", [now])?;
            t.execute(
                "INSERT INTO tokens (id, secret_sha256, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, secret_sha256, expires_at, now],
            )
            .map(drop)
        })
        .await
    }

    /// The stored secret hash and expiry of token `id`.
    pub async fn token(&self, id: String) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        self.call(move |t| {
            t.query_row(
                "SELECT secret_sha256, expires_at FROM tokens WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .await
    }

    /// Every join token: id, expiry and creation (unix seconds), newest first.
    pub async fn tokens(&self) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.call(|t| {
            let mut stmt = t.prepare(
                "SELECT id, expires_at, created_at FROM tokens ORDER BY created_at DESC",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await
    }

    /// Deletes join token `id`; whether there was one.
    pub async fn delete_token(&self, id: String) -> Result<bool, StoreError> {
        self.call(move |t| Ok(t.execute("DELETE FROM tokens WHERE id = ?1", [id])? > 0))
            .await
    }

    /// The node called `name`, if it joined.
    pub async fn node(&self, name: String) -> Result<Option<JoinedNode>, StoreError> {
        self.call(move |t| {
            t.query_row(
                "SELECT name, key_sha256, cert_not_after FROM nodes WHERE name = ?1",
                [name],
                |r| {
                    Ok(JoinedNode {
                        name: r.get(0)?,
                        key_sha256: r.get(1)?,
                        cert_not_after: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// Records the certificate just issued to a node (a join or a renewal).
    pub async fn add_node(&self, node: JoinedNode, now: i64) -> Result<(), StoreError> {
        self.call(move |t| {
            t.execute(
                "INSERT INTO nodes (name, key_sha256, cert_not_after, joined_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET key_sha256 = excluded.key_sha256,
                     cert_not_after = excluded.cert_not_after",
                params![node.name, node.key_sha256, node.cert_not_after, now],
            )
            .map(drop)
        })
        .await
    }

    /// Forgets a node and its sync state; returns whether it was known.
    pub async fn remove_node(&self, name: String) -> Result<bool, StoreError> {
        self.call(move |t| {
            t.execute("DELETE FROM sync_states WHERE peer = ?1", [&name])?;
            Ok(t.execute("DELETE FROM nodes WHERE name = ?1", [&name])? > 0)
        })
        .await
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let err = |source| sqlite_err(path, source);
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    // This connection is the database's only one (the state dir is locked to one daemon):
    // held exclusively from its first read, the write-ahead log's index lives in memory
    // instead of a shared `-shm` file that every transaction locks and reads.
    conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE;")
        .map_err(err)?;
    // A statement's plan is kept whatever values are bound to it: SQLite (built with STAT4)
    // would otherwise prepare a cached statement again on every bind of a value its plan
    // looked at, such as the document's key of a chunk's insert.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(err)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: check,
        });
    }
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(err)?;
    restrict_permissions(path);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let target = i as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN; {migration} PRAGMA user_version = {target}; COMMIT;"
        ))
        .map_err(err)?;
    }
    Ok(conn)
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        let _ = std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600));
    }
}

fn writer_loop(
    mut conn: Connection,
    queue: &mut mpsc::UnboundedReceiver<Job>,
    path: &Path,
    timer: &Histogram,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        if let Err(e) = run_batch(&mut conn, batch) {
            tracing::error!(db = %path.display(), error = %e, "database transaction failed");
        }
        timer.observe(started.elapsed().as_secs_f64());
    }
}

/// Runs a batch in one transaction, each job in its own savepoint (a failed job rolls back
/// alone; a job alone needs none, its transaction is its savepoint), and replies to every job
/// only after the commit.
fn run_batch(conn: &mut Connection, batch: Vec<Job>) -> Result<(), rusqlite::Error> {
    let mut replies = Vec::with_capacity(batch.len());
    let outcome = (|| {
        let mut tx = conn.transaction()?;
        let batch = match <[Job; 1]>::try_from(batch) {
            Ok([job]) => {
                let (ok, reply) = job(&tx);
                replies.push(reply);
                return if ok { tx.commit() } else { tx.rollback() };
            }
            Err(batch) => batch,
        };
        for job in batch {
            let mut sp = tx.savepoint()?;
            let (ok, reply) = job(&sp);
            replies.push(reply);
            if ok {
                sp.commit()?;
            } else {
                sp.rollback()?;
            }
        }
        tx.commit()
    })();
    let error = outcome.as_ref().err();
    for reply in replies {
        reply(error);
    }
    outcome
}

/// A document's next chunk, after its others.
const INSERT_CHUNK: &str = "INSERT INTO doc_chunks (key, seq, data) VALUES
     (?1, (SELECT IFNULL(MAX(seq), 0) + 1 FROM doc_chunks WHERE key = ?1), ?2)";

fn save_doc(t: &Connection, save: DocSave) -> Result<(), rusqlite::Error> {
    let key = save.key;
    match save.write {
        DocWrite::Chunk(chunk) if chunk.is_empty() => {}
        DocWrite::Chunk(chunk) => {
            t.prepare_cached(INSERT_CHUNK)?
                .execute(params![key, chunk])?;
        }
        DocWrite::Snapshot(snapshot) => {
            t.execute(
                "INSERT INTO docs (key, snapshot) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET snapshot = excluded.snapshot",
                params![key, snapshot],
            )?;
            t.execute("DELETE FROM doc_chunks WHERE key = ?1", [&key])?;
        }
    }
    if let Some(at) = save.synced_at {
        t.prepare_cached("UPDATE docs SET last_synced_at = ?2 WHERE key = ?1")?
            .execute(params![key, at])?;
    }
    for (peer, state) in save.sync_states {
        upsert_sync_state(t, &peer, &key, &state)?;
    }
    Ok(())
}

fn upsert_sync_state(
    t: &Connection,
    peer: &str,
    key: &str,
    state: &[u8],
) -> Result<(), rusqlite::Error> {
    t.prepare_cached(
        "INSERT INTO sync_states (peer, key, state) VALUES (?1, ?2, ?3)
         ON CONFLICT (peer, key) DO UPDATE SET state = excluded.state",
    )?
    .execute(params![peer, key, state])?;
    Ok(())
}

fn sqlite_err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_older_database_is_migrated_and_keeps_what_it_owns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgesync.db");
        {
            // A database as a build knowing three migrations left it.
            let conn = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..3] {
                conn.execute_batch(migration).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 3;
                 INSERT INTO manifests (file, key, pod, sha256)
                 VALUES ('edgesync_default_web.json', 'default/edge01', 'web', 'ab12');
                 INSERT INTO docs (key, snapshot) VALUES ('default/edge01', x'00');
                 INSERT INTO doc_chunks (key, data) VALUES ('default/edge01', x'02');
                 INSERT INTO doc_chunks (key, data) VALUES ('default/other', x'07');
                 INSERT INTO doc_chunks (key, data) VALUES ('default/edge01', x'01');
                 INSERT INTO sync_states (peer, key, state) VALUES ('head', 'default/edge01', x'05');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let web = OwnedFile {
            file: "edgesync_default_web.json".into(),
            key: "default/edge01".into(),
            pod: "web".into(),
        };
        assert_eq!(
            store.owned_files().await.unwrap(),
            std::slice::from_ref(&web)
        );
        let db = OwnedFile {
            file: "edgesync_default_db.json".into(),
            pod: "db".into(),
            ..web.clone()
        };
        store.own_file(db.clone()).await.unwrap();
        assert_eq!(store.owned_files().await.unwrap(), [db, web]);
        // A document's chunks keep their order, and a new one goes after them.
        let chunks = || async {
            let doc = store.load_doc("default/edge01".into()).await.unwrap();
            doc.unwrap().chunks
        };
        assert_eq!(chunks().await, [vec![2], vec![1]]);
        let save = DocSave {
            key: "default/edge01".into(),
            write: DocWrite::Chunk(vec![3]),
            sync_states: vec![("head".into(), vec![6])],
            synced_at: None,
        };
        store.save_docs(vec![save]).await.unwrap();
        assert_eq!(chunks().await, [vec![2], vec![1], vec![3]]);
        // Another document's chunk: the statement is not prepared again for its key.
        let save = DocSave {
            key: "default/other".into(),
            write: DocWrite::Chunk(vec![8]),
            sync_states: Vec::new(),
            synced_at: None,
        };
        store.save_docs(vec![save]).await.unwrap();
        let reprepared = store
            .inspect(|conn| {
                let stmt = conn.prepare_cached(INSERT_CHUNK)?;
                Ok(stmt.get_status(rusqlite::StatementStatus::RePrepare))
            })
            .await
            .unwrap();
        assert_eq!(reprepared, 0);
        assert_eq!(
            store.sync_states("head").await.unwrap(),
            [("default/edge01".to_string(), vec![6])]
        );
        let version: i64 = store
            .inspect(|conn| conn.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
