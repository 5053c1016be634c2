//! Static pod manifests: pure rendering and planning; the thin IO that carries a plan out
//! is in `disk`.

pub(crate) mod disk;

pub use disk::{inspect, remove, remove_temp_files};

use crate::crd::{MANAGED_ANNOTATION, MANAGED_LABEL, SOURCE_ANNOTATION};
use crate::store::OwnedFile;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::input::MAX_FILE_NAME;

/// A manifest that should exist.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// File name inside the manifest directory.
    pub file: String,
    /// EdgeNode key.
    pub key: String,
    /// Pod name.
    pub pod: String,
    /// File content.
    pub content: Vec<u8>,
}

impl Desired {
    /// Builds the manifest of `pod` from EdgeNode `namespace/name`: the pod's namespace is forced
    /// to the EdgeNode's, and it is annotated and labelled as managed by edgesync.
    pub fn render(namespace: &str, edgenode: &str, pod_name: &str, pod: &Value) -> Desired {
        let key = format!("{namespace}/{edgenode}");
        let mut pod = pod.clone();
        if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String(namespace.to_string()));
            mark(meta, "labels", &[(MANAGED_LABEL, "true")]);
            mark(
                meta,
                "annotations",
                &[(MANAGED_ANNOTATION, "true"), (SOURCE_ANNOTATION, &key)],
            );
        }
        let mut content = serde_json::to_vec_pretty(&pod).expect("a JSON value serialises");
        content.push(b'\n');
        Desired {
            file: file_name(namespace, pod_name),
            key,
            pod: pod_name.to_string(),
            content,
        }
    }

    /// SHA-256 of the content, hex.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.content)
    }
}

/// Sets `entries` in the string map `field` of `meta` (labels, annotations), creating it.
fn mark(meta: &mut serde_json::Map<String, Value>, field: &str, entries: &[(&str, &str)]) {
    let map = meta
        .entry(field)
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(map) = map.as_object_mut() {
        for (k, v) in entries {
            map.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
}

pub use crate::input::manifest_file_name as file_name;

/// Writes `want` into `dir` as [`disk::write`] does, on a thread of the runtime's blocking
/// pool: the write's two fsyncs (milliseconds on an edge's flash, far more while it is busy)
/// hold up no sync session, keep-alive or other document meanwhile.
pub async fn write(dir: &Path, want: &Desired) -> std::io::Result<()> {
    let (dir, file, content) = (dir.to_path_buf(), want.file.clone(), want.content.clone());
    let written = tokio::task::spawn_blocking(move || disk::write(&dir, &file, &content)).await;
    match written {
        Ok(written) => written,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(std::io::Error::other("the daemon is stopping")),
    }
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Why a file name cannot be a manifest's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// It could leave the manifest directory, or name a hidden file.
    #[error("{file:?} is not a plain file name")]
    NotPlain {
        /// The file name.
        file: String,
    },
    /// No file system would hold a name that long.
    #[error(
        "its manifest file name would be {} bytes, more than the {MAX_FILE_NAME} a file name may have; use a shorter pod name",
        .file.len()
    )]
    TooLong {
        /// The file name.
        file: String,
    },
}

/// Why `file` cannot be a manifest's name: it could leave the directory, or no file system
/// would hold a name that long.
pub fn check_file_name(file: &str) -> Result<(), ManifestError> {
    let plain = !file.is_empty() && !file.starts_with('.') && !file.contains(['/', '\\', '\0']);
    if !plain {
        return Err(ManifestError::NotPlain { file: file.into() });
    }
    if file.len() > MAX_FILE_NAME {
        return Err(ManifestError::TooLong { file: file.into() });
    }
    Ok(())
}

/// `dir/file` if `file` is a plain file name that cannot leave `dir` and can exist.
pub fn path_in(dir: &Path, file: &str) -> Option<PathBuf> {
    check_file_name(file).ok().map(|()| dir.join(file))
}

/// Why a pod's manifest is not written: the code its state and the EdgeNode's
/// `ManifestsWritten` condition carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The name holds a file edgesync did not write, or something that is not a file.
    FileNameTaken,
    /// The manifest directory refuses writes (permissions, a read-only file system).
    ManifestDirNotWritable,
    /// No space (or quota) is left on the manifest directory's file system.
    DiskFull,
    /// The pod's name makes a file name no file system holds: a refusal, not a failure.
    InvalidFileName,
    /// Any other failure.
    WriteFailed,
}

impl Cause {
    /// The cause of a failed write.
    pub fn of(error: &std::io::Error) -> Cause {
        use std::io::ErrorKind::*;
        match error.kind() {
            PermissionDenied | ReadOnlyFilesystem => Cause::ManifestDirNotWritable,
            StorageFull | QuotaExceeded => Cause::DiskFull,
            _ => Cause::WriteFailed,
        }
    }

    /// The code, as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::FileNameTaken => "FileNameTaken",
            Cause::ManifestDirNotWritable => "ManifestDirNotWritable",
            Cause::DiskFull => "DiskFull",
            Cause::InvalidFileName => "InvalidFileName",
            Cause::WriteFailed => "WriteFailed",
        }
    }
}

/// A desired file that cannot be written now: why, and in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    /// The file.
    pub want: Desired,
    /// Why, as a code.
    pub cause: Cause,
    /// Why, in words.
    pub reason: String,
}

/// What to do to reach the desired files.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Files to (re)write: missing, changed in the spec, or edited by hand.
    pub write: Vec<Desired>,
    /// Owned files no longer desired: delete them (whatever their content now).
    pub remove: Vec<OwnedFile>,
    /// Owned files no longer desired whose path now holds something that is not a regular
    /// file: nothing of edgesync's is left there, so forget them and leave the path alone.
    pub forget: Vec<(OwnedFile, String)>,
    /// Desired files that cannot be written now: the pod's failure alone.
    pub blocked: Vec<Blocked>,
}

/// What occupies a path in the manifest directory, seen without following a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    /// Nothing.
    Absent,
    /// A regular file.
    File {
        /// SHA-256 of its content, hex, if it was read (see [`Look`]).
        sha256: Option<String>,
        /// The EdgeNode key in its annotations, if it is marked as managed by edgesync (and
        /// they were read: see [`inspect`]).
        managed_by: Option<String>,
    },
    /// Something edgesync never writes through, replaces nor removes: a directory, a
    /// symbolic link (dangling or not), a device. Says which.
    NotAFile(&'static str),
    /// The path could not be looked at; the error.
    Unreadable(String),
}

/// How much [`inspect`] reads of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Only that it is one: a manifest edgesync owns, to be written whatever it holds.
    Kind,
    /// Its digest: a manifest edgesync owns, left alone if it holds what is wanted.
    Content,
    /// Its digest and edgesync's annotations: a file edgesync does not own.
    Annotations,
}

/// Plans the changes. `on_disk` inspects a path. `keep` lists owned files to leave alone
/// although not desired (pods refused after being applied keep their previous manifest).
///
/// A path edgesync owns (recorded in SQLite) holding a regular file is made to match the
/// document whatever its content, and removed when no longer desired. A regular file
/// edgesync has no record of is adopted only if it carries edgesync's annotations for the
/// same EdgeNode (a state dir that was lost); otherwise it blocks the pod. Anything that is
/// not a regular file blocks the pod until it is gone, and is never touched.
pub fn plan(
    desired: &[Desired],
    owned: &[OwnedFile],
    keep: &[String],
    on_disk: impl Fn(&str) -> OnDisk,
) -> Plan {
    let owned_by_file: BTreeMap<&str, &OwnedFile> =
        owned.iter().map(|o| (o.file.as_str(), o)).collect();
    let mut plan = Plan::default();
    for want in desired {
        let block = |cause, reason| Blocked {
            want: want.clone(),
            cause,
            reason,
        };
        if let Err(e) = check_file_name(&want.file) {
            plan.blocked
                .push(block(Cause::InvalidFileName, e.to_string()));
            continue;
        }
        let ours = owned_by_file.contains_key(want.file.as_str());
        let file = &want.file;
        let blocked = match on_disk(file) {
            OnDisk::Absent => None,
            OnDisk::File {
                sha256: Some(sha256),
                ..
            } if ours && *sha256 == want.sha256() => continue,
            OnDisk::File { .. } if ours => None,
            OnDisk::File { managed_by, .. } if managed_by.as_ref() == Some(&want.key) => None,
            OnDisk::File { .. } => Some((
                Cause::FileNameTaken,
                format!("{file} exists in the manifest directory and was not written by edgesync"),
            )),
            OnDisk::NotAFile(kind) => Some((
                Cause::FileNameTaken,
                format!(
                    "{file} in the manifest directory is a {kind}; edgesync never follows, replaces \
                 or removes it, and writes the manifest once it is gone"
                ),
            )),
            OnDisk::Unreadable(error) => Some((
                Cause::WriteFailed,
                format!("{file} in the manifest directory cannot be looked at: {error}"),
            )),
        };
        match blocked {
            None => plan.write.push(want.clone()),
            Some((cause, reason)) => plan.blocked.push(block(cause, reason)),
        }
    }
    for file in owned {
        let wanted = desired.iter().any(|d| d.file == file.file);
        if wanted || keep.contains(&file.file) {
            continue;
        }
        match on_disk(&file.file) {
            OnDisk::NotAFile(kind) => plan.forget.push((
                file.clone(),
                format!("a {kind} is in its place; leaving it alone"),
            )),
            _ => plan.remove.push(file.clone()),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(image: &str) -> Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "evil"},
            "spec": {"containers": [{"name": "c", "image": image}]}})
    }

    fn owned(d: &Desired) -> OwnedFile {
        OwnedFile {
            file: d.file.clone(),
            key: d.key.clone(),
            pod: d.pod.clone(),
        }
    }

    #[test]
    fn render_forces_namespace_and_marks_ownership() {
        let d = Desired::render("team-a", "edge01", "web", &pod("nginx"));
        assert_eq!(d.file, "edgesync_team-a_web.json");
        let v: Value = serde_json::from_slice(&d.content).unwrap();
        assert_eq!(v["metadata"]["namespace"], "team-a");
        assert_eq!(v["metadata"]["annotations"][MANAGED_ANNOTATION], "true");
        assert_eq!(v["metadata"]["labels"][MANAGED_LABEL], "true");
        assert_eq!(
            v["metadata"]["annotations"][SOURCE_ANNOTATION],
            "team-a/edge01"
        );
    }

    fn found(sha: &str, managed_by: Option<&str>) -> OnDisk {
        OnDisk::File {
            sha256: Some(sha.to_string()),
            managed_by: managed_by.map(str::to_string),
        }
    }

    fn blocked_pods(plan: &Plan) -> Vec<&str> {
        plan.blocked.iter().map(|b| b.want.pod.as_str()).collect()
    }

    #[test]
    fn plan_writes_missing_changed_and_drifted_and_never_foreign_files() {
        let a = Desired::render("default", "edge01", "web", &pod("nginx"));
        let b = Desired::render("default", "edge01", "db", &pod("redis"));
        let gone = OwnedFile {
            file: "edgesync_default_old.json".into(),
            key: "default/edge01".into(),
            pod: "old".into(),
        };
        let a_sha = a.sha256();
        let plan_ = plan(
            &[a.clone(), b.clone()],
            &[owned(&a), gone.clone()],
            &[],
            |f| {
                if f == a.file {
                    found(&a_sha, Some("default/edge01"))
                } else if f == b.file {
                    found("foreign", None)
                } else {
                    found("x", None)
                }
            },
        );
        assert!(plan_.write.is_empty());
        assert_eq!(blocked_pods(&plan_), ["db"]);
        assert!(plan_.blocked[0].reason.contains("not written by edgesync"));
        assert_eq!(plan_.blocked[0].cause, Cause::FileNameTaken);
        assert_eq!(plan_.remove, vec![gone.clone()]);
        let drifted = plan(std::slice::from_ref(&a), &[owned(&a)], &[], |_| {
            found("edited", None)
        });
        assert_eq!(drifted.write, vec![a.clone()]);
        let kept = plan(
            &[],
            std::slice::from_ref(&gone),
            std::slice::from_ref(&gone.file),
            |_| OnDisk::Absent,
        );
        assert!(kept.remove.is_empty());
    }

    #[test]
    fn plan_adopts_own_files_after_state_loss_and_removes_owned_files_whatever_their_content() {
        let a = Desired::render("default", "edge01", "web", &pod("nginx"));
        let adopted = plan(std::slice::from_ref(&a), &[], &[], |_| {
            found("old", Some("default/edge01"))
        });
        assert_eq!(adopted.write, vec![a.clone()]);
        let other_node = plan(std::slice::from_ref(&a), &[], &[], |_| {
            found("old", Some("default/edge02"))
        });
        assert_eq!(blocked_pods(&other_node), ["web"]);
        // Recorded as written: edited by hand, it is still edgesync's to remove or repair.
        for content in [found("someone else's", None), found("edited", Some("x/y"))] {
            let removed = plan(&[], &[owned(&a)], &[], |_| content.clone());
            assert_eq!((removed.remove.len(), removed.forget.len()), (1, 0));
            let repaired = plan(std::slice::from_ref(&a), &[owned(&a)], &[], |_| {
                content.clone()
            });
            assert_eq!(repaired.write, vec![a.clone()]);
        }
    }

    #[test]
    fn plan_never_writes_or_removes_what_is_not_a_regular_file() {
        let a = Desired::render("default", "edge01", "web", &pod("nginx"));
        for (kind, ours) in [
            ("directory", true),
            ("symbolic link", true),
            ("symbolic link", false),
        ] {
            let owned_files = if ours { vec![owned(&a)] } else { vec![] };
            let blocked = plan(std::slice::from_ref(&a), &owned_files, &[], |_| {
                OnDisk::NotAFile(kind)
            });
            assert!(blocked.write.is_empty());
            assert_eq!(blocked_pods(&blocked), ["web"]);
            assert!(blocked.blocked[0].reason.contains(kind), "{blocked:?}");
            assert_eq!(blocked.blocked[0].cause, Cause::FileNameTaken);
        }
        let gone = plan(&[], &[owned(&a)], &[], |_| OnDisk::NotAFile("directory"));
        assert!(gone.remove.is_empty());
        assert_eq!(gone.forget.len(), 1);
        let unreadable = plan(std::slice::from_ref(&a), &[], &[], |_| {
            OnDisk::Unreadable("permission denied".into())
        });
        assert_eq!(blocked_pods(&unreadable), ["web"]);
    }

    #[test]
    fn a_failed_write_is_told_by_its_cause() {
        let cause = |errno| Cause::of(&std::io::Error::from_raw_os_error(errno)).as_str();
        // EACCES, EPERM, EROFS, ENOSPC, EDQUOT, EIO
        assert_eq!(cause(13), "ManifestDirNotWritable");
        assert_eq!(cause(1), "ManifestDirNotWritable");
        assert_eq!(cause(30), "ManifestDirNotWritable");
        assert_eq!(cause(28), "DiskFull");
        assert_eq!(cause(122), "DiskFull");
        assert_eq!(cause(5), "WriteFailed");
    }

    #[test]
    fn a_name_too_long_for_a_file_blocks_its_pod_alone() {
        let long = "a".repeat(240);
        let a = Desired::render("default", "edge01", &long, &pod("nginx"));
        let b = Desired::render("default", "edge01", "web", &pod("nginx"));
        let plan_ = plan(&[a, b.clone()], &[], &[], |f| {
            assert!(f.len() <= MAX_FILE_NAME, "never looked at");
            OnDisk::Absent
        });
        assert_eq!(plan_.write, vec![b]);
        assert_eq!(blocked_pods(&plan_), [long.as_str()]);
        assert!(
            plan_.blocked[0]
                .reason
                .contains("262 bytes, more than the 255")
        );
    }

    #[test]
    fn only_plain_names_are_joined() {
        let dir = Path::new("/m");
        assert_eq!(
            path_in(dir, "edgesync_a_b.json"),
            Some(PathBuf::from("/m/edgesync_a_b.json"))
        );
        let long = "a".repeat(256);
        for bad in ["", "../x", "a/b", ".hidden", "..", &long] {
            assert_eq!(path_in(dir, bad), None, "{bad}");
        }
    }

    #[test]
    fn refused_file_names_say_why() {
        assert_eq!(
            check_file_name("../x").unwrap_err().to_string(),
            "\"../x\" is not a plain file name"
        );
        assert_eq!(
            check_file_name(&"a".repeat(300)).unwrap_err().to_string(),
            "its manifest file name would be 300 bytes, more than the 255 a file name may have; \
             use a shorter pod name"
        );
    }
}
