//! Static pod manifests: pure rendering and planning, plus the thin IO that looks at a path
//! without following links, writes files atomically, and removes only regular files
//! edgesync owns (recorded in SQLite).

use crate::crd::{MANAGED_ANNOTATION, MANAGED_LABEL, SOURCE_ANNOTATION};
use crate::fsutil::{self, TEMP_PREFIX, TEMP_SUFFIX};
use crate::store::OwnedFile;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The longest file name a Linux file system holds (`NAME_MAX`), in bytes.
pub const MAX_FILE_NAME: usize = 255;
/// A file larger than this is hashed but not parsed for edgesync's annotations.
const PARSE_LIMIT: usize = 8 << 20;

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

/// `edgesync_<namespace>_<pod>.json`: `_` never occurs in DNS-1123 names, so names never clash.
pub fn file_name(namespace: &str, pod: &str) -> String {
    format!("edgesync_{namespace}_{pod}.json")
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Why `file` cannot be a manifest's name: it could leave the directory, or no file system
/// would hold a name that long.
pub fn check_file_name(file: &str) -> Result<(), String> {
    let plain = !file.is_empty() && !file.starts_with('.') && !file.contains(['/', '\\', '\0']);
    if !plain {
        return Err(format!("{file:?} is not a plain file name"));
    }
    if file.len() > MAX_FILE_NAME {
        return Err(format!(
            "its manifest file name would be {} bytes, more than the {MAX_FILE_NAME} a file name may have; use a shorter pod name",
            file.len()
        ));
    }
    Ok(())
}

/// `dir/file` if `file` is a plain file name that cannot leave `dir` and can exist.
pub fn path_in(dir: &Path, file: &str) -> Option<PathBuf> {
    check_file_name(file).ok().map(|()| dir.join(file))
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
    /// Desired files that cannot be written now, with the reason: the pod's failure alone.
    pub blocked: Vec<(Desired, String)>,
}

/// What occupies a path in the manifest directory, seen without following a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    /// Nothing.
    Absent,
    /// A regular file.
    File {
        /// SHA-256 of its content, hex.
        sha256: String,
        /// The EdgeNode key in its annotations, if it is marked as managed by edgesync.
        managed_by: Option<String>,
    },
    /// Something edgesync never writes through, replaces nor removes: a directory, a
    /// symbolic link (dangling or not), a device. Says which.
    NotAFile(&'static str),
    /// The path could not be looked at; the error.
    Unreadable(String),
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
        if let Err(reason) = check_file_name(&want.file) {
            plan.blocked.push((want.clone(), reason));
            continue;
        }
        let ours = owned_by_file.contains_key(want.file.as_str());
        let file = &want.file;
        let blocked = match on_disk(file) {
            OnDisk::Absent => None,
            OnDisk::File { sha256, .. } if ours && sha256 == want.sha256() => continue,
            OnDisk::File { .. } if ours => None,
            OnDisk::File { managed_by, .. } if managed_by.as_ref() == Some(&want.key) => None,
            OnDisk::File { .. } => Some(format!(
                "{file} exists in the manifest directory and was not written by edgesync"
            )),
            OnDisk::NotAFile(kind) => Some(format!(
                "{file} in the manifest directory is a {kind}; edgesync never follows, replaces \
                 or removes it, and writes the manifest once it is gone"
            )),
            OnDisk::Unreadable(error) => Some(format!(
                "{file} in the manifest directory cannot be looked at: {error}"
            )),
        };
        match blocked {
            None => plan.write.push(want.clone()),
            Some(reason) => plan.blocked.push((want.clone(), reason)),
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

/// Inspects a path in `dir` without following a link.
pub fn inspect(dir: &Path, file: &str) -> OnDisk {
    let Some(path) = path_in(dir, file) else {
        return OnDisk::Unreadable(format!("{file:?} is not a plain file name"));
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return OnDisk::Absent,
        Err(e) => return OnDisk::Unreadable(e.to_string()),
    };
    if let Some(kind) = not_a_file(&meta) {
        return OnDisk::NotAFile(kind);
    }
    match read_regular(&path) {
        Ok((sha256, bytes)) => OnDisk::File {
            sha256,
            managed_by: bytes.as_deref().and_then(managed_by),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => OnDisk::Absent,
        Err(e) => OnDisk::Unreadable(e.to_string()),
    }
}

/// What `meta` (from `symlink_metadata`) is, unless it is a regular file.
fn not_a_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    if kind.is_file() {
        None
    } else if kind.is_symlink() {
        Some("symbolic link")
    } else if kind.is_dir() {
        Some("directory")
    } else {
        Some("special file")
    }
}

/// Opens `path` without following a link (nor blocking on a FIFO) and checks that it is a
/// regular file.
fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    match not_a_file(&file.metadata()?) {
        None => Ok(file),
        Some(kind) => Err(io::Error::other(format!("it is a {kind}"))),
    }
}

/// The SHA-256 (hex) of a regular file, and its bytes if it is small enough to parse.
fn read_regular(path: &Path) -> io::Result<(String, Option<Vec<u8>>)> {
    let mut file = open_regular(path)?;
    let mut hash = Sha256::new();
    let mut bytes = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        if bytes.len() <= PARSE_LIMIT {
            bytes.extend_from_slice(&buf[..n]);
        }
    }
    let small = bytes.len() <= PARSE_LIMIT;
    Ok((hex::encode(hash.finalize()), small.then_some(bytes)))
}

/// The EdgeNode key in a manifest's annotations, if it is marked as managed by edgesync.
fn managed_by(bytes: &[u8]) -> Option<String> {
    let manifest = serde_json::from_slice::<Value>(bytes).ok()?;
    let annotations = &manifest["metadata"]["annotations"];
    (annotations[MANAGED_ANNOTATION] == "true")
        .then(|| annotations[SOURCE_ANNOTATION].as_str().map(str::to_string))
        .flatten()
}

/// Whether a regular file is at `path` (Ok(false) if nothing is); an error if something else
/// is, which is never followed, replaced nor removed.
fn regular_or_absent(path: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => match not_a_file(&meta) {
            None => Ok(true),
            Some(kind) => Err(io::Error::other(format!(
                "a {kind} is in its place; edgesync never follows, replaces or removes it"
            ))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `want` into `dir` atomically (temp file, fsync, rename), unless its path holds
/// something that is not a regular file.
pub fn write(dir: &Path, want: &Desired) -> io::Result<()> {
    let path = path_in(dir, &want.file).ok_or_else(|| io::Error::other("not a plain file name"))?;
    regular_or_absent(&path)?;
    // A link planted after the check is replaced by the rename, never written through.
    fsutil::write_atomic(&path, &want.content, 0o600)
}

/// Removes `file` from `dir` if it is a regular file; returns whether there was one.
pub fn remove(dir: &Path, file: &str) -> io::Result<bool> {
    let Some(path) = path_in(dir, file) else {
        return Ok(false);
    };
    if !regular_or_absent(&path)? {
        return Ok(false);
    }
    // Unlinking never follows a link.
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `name` is one of edgesync's own temp files: `.edgesync-<letters and digits>.tmp`.
pub fn is_temp_file(name: &str) -> bool {
    name.strip_prefix(TEMP_PREFIX)
        .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
        .is_some_and(|random| {
            (1..=32).contains(&random.len()) && random.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// Removes the temp files a crash left in `dir` (regular files named as edgesync names its
/// own, nothing else); returns their names.
pub fn remove_temp_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !is_temp_file(&name) || !entry.file_type()?.is_file() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
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
            sha256: d.sha256(),
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
            sha256: sha.to_string(),
            managed_by: managed_by.map(str::to_string),
        }
    }

    fn blocked_pods(plan: &Plan) -> Vec<&str> {
        plan.blocked.iter().map(|(d, _)| d.pod.as_str()).collect()
    }

    #[test]
    fn plan_writes_missing_changed_and_drifted_and_never_foreign_files() {
        let a = Desired::render("default", "edge01", "web", &pod("nginx"));
        let b = Desired::render("default", "edge01", "db", &pod("redis"));
        let gone = OwnedFile {
            file: "edgesync_default_old.json".into(),
            key: "default/edge01".into(),
            pod: "old".into(),
            sha256: "x".into(),
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
        assert!(plan_.blocked[0].1.contains("not written by edgesync"));
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
            assert!(blocked.blocked[0].1.contains(kind), "{blocked:?}");
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
        assert!(plan_.blocked[0].1.contains("262 bytes, more than the 255"));
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
    fn inspect_sees_links_and_directories_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target.json");
        std::fs::write(&target, b"{}").unwrap();
        let m = dir.path();
        std::os::unix::fs::symlink(&target, m.join("linked.json")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("none"), m.join("dangling.json")).unwrap();
        std::fs::create_dir(m.join("dir.json")).unwrap();
        let a = Desired::render("default", "edge01", "web", &pod("nginx"));
        std::fs::write(m.join("file.json"), &a.content).unwrap();
        assert_eq!(inspect(m, "linked.json"), OnDisk::NotAFile("symbolic link"));
        assert_eq!(
            inspect(m, "dangling.json"),
            OnDisk::NotAFile("symbolic link")
        );
        assert_eq!(inspect(m, "dir.json"), OnDisk::NotAFile("directory"));
        assert_eq!(inspect(m, "absent.json"), OnDisk::Absent);
        assert_eq!(
            inspect(m, "file.json"),
            found(&a.sha256(), Some("default/edge01"))
        );
        // Neither writing nor removing goes through a link or into a directory.
        for name in ["linked.json", "dangling.json", "dir.json"] {
            let want = Desired {
                file: name.into(),
                ..a.clone()
            };
            assert!(write(m, &want).is_err(), "{name}");
            assert!(remove(m, name).is_err(), "{name}");
        }
        assert!(m.join("linked.json").is_symlink() && m.join("dangling.json").is_symlink());
        assert!(m.join("dir.json").is_dir());
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        assert!(!outside.path().join("none").exists());
        assert!(remove(m, "file.json").unwrap());
        assert!(!remove(m, "file.json").unwrap());
    }

    #[test]
    fn only_edgesyncs_own_temp_files_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        for name in [".edgesync-x.tmp", ".edgesync-Ab12Cd.tmp"] {
            std::fs::write(m.join(name), "partial").unwrap();
        }
        let kept = [
            ".edgesync-.tmp",
            ".edgesync-x.tmp.bak",
            ".edgesync-a-b.tmp",
            "edgesync-x.tmp",
            "edgesync_default_web.json",
            ".other-x.tmp",
        ];
        for name in kept {
            std::fs::write(m.join(name), "not a leftover").unwrap();
        }
        std::fs::create_dir(m.join(".edgesync-dir.tmp")).unwrap();
        std::os::unix::fs::symlink(
            m.join("edgesync_default_web.json"),
            m.join(".edgesync-link.tmp"),
        )
        .unwrap();
        let mut removed = remove_temp_files(m).unwrap();
        removed.sort();
        assert_eq!(removed, [".edgesync-Ab12Cd.tmp", ".edgesync-x.tmp"]);
        for name in kept {
            assert_eq!(
                std::fs::read_to_string(m.join(name)).unwrap(),
                "not a leftover"
            );
        }
        assert!(m.join(".edgesync-dir.tmp").is_dir());
        assert!(m.join(".edgesync-link.tmp").is_symlink());
        // The pattern is the one the atomic writer uses.
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(m)
            .unwrap();
        let name = tmp.path().file_name().unwrap().to_str().unwrap();
        assert!(is_temp_file(name), "{name}");
    }
}
