//! The manifest directory, seen and changed without following a link: inspect a path,
//! write a manifest atomically, remove only regular files, clean up a crash's temp files.

use super::{Look, OnDisk, path_in};
use crate::crd::{MANAGED_ANNOTATION, SOURCE_ANNOTATION};
use crate::fsutil::{self, TEMP_PREFIX, TEMP_SUFFIX};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::Path;

/// A file larger than this is hashed but not parsed for edgesync's annotations.
const PARSE_LIMIT: usize = 8 << 20;

/// Inspects a path in `dir` without following a link, reading as much of a regular file as
/// `look` asks.
pub fn inspect(dir: &Path, file: &str, look: Look) -> OnDisk {
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
    if look == Look::Kind {
        return OnDisk::File {
            sha256: None,
            managed_by: None,
        };
    }
    match read_regular(&path) {
        Ok((sha256, bytes)) => OnDisk::File {
            sha256: Some(sha256),
            managed_by: bytes
                .filter(|_| look == Look::Annotations)
                .as_deref()
                .and_then(managed_by),
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
fn open_regular(path: &Path) -> io::Result<(std::fs::File, std::fs::Metadata)> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    match not_a_file(&meta) {
        None => Ok((file, meta)),
        Some(kind) => Err(io::Error::other(format!("it is a {kind}"))),
    }
}

/// The SHA-256 (hex) of a regular file, and its bytes if it is small enough to parse.
fn read_regular(path: &Path) -> io::Result<(String, Option<Vec<u8>>)> {
    #[cfg(test)]
    tests::CONTENT_READS.with(|n| n.set(n.get() + 1));
    let (mut file, meta) = open_regular(path)?;
    // A manifest is read whole in one go; what is beyond the limit is hashed, not kept.
    let limit = PARSE_LIMIT as u64 + 1;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    (&mut file).take(limit).read_to_end(&mut bytes)?;
    let mut hash = Sha256::new();
    hash.update(&bytes);
    let small = bytes.len() <= PARSE_LIMIT;
    if !small {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
    }
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

/// Writes `content` into `file` in `dir` atomically (temp file, fsync, rename), unless its
/// path holds something that is not a regular file.
pub fn write(dir: &Path, file: &str, content: &[u8]) -> io::Result<()> {
    let path = path_in(dir, file).ok_or_else(|| io::Error::other("not a plain file name"))?;
    regular_or_absent(&path)?;
    // A link planted after the check is replaced by the rename, never written through.
    fsutil::write_atomic(&path, content, 0o600)
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
fn is_temp_file(name: &str) -> bool {
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
pub(crate) mod tests {
    use super::*;
    use crate::edge::manifests::Desired;

    thread_local! {
        /// Regular files whose content was read (a `#[tokio::test]` runs its tasks on its
        /// thread).
        pub(crate) static CONTENT_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_file_past_the_parse_limit_is_hashed_whole_and_not_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let pod = serde_json::json!({"metadata": {"name": "web"}, "spec": {}});
        let mut content = Desired::render("default", "edge01", "web", &pod).content;
        content.resize(PARSE_LIMIT + 100_000, b' ');
        std::fs::write(dir.path().join("big.json"), &content).unwrap();
        assert_eq!(
            inspect(dir.path(), "big.json", Look::Annotations),
            OnDisk::File {
                sha256: Some(hex::encode(Sha256::digest(&content))),
                managed_by: None,
            }
        );
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
        let pod = serde_json::json!({"metadata": {"name": "web"}, "spec": {}});
        let a = Desired::render("default", "edge01", "web", &pod);
        std::fs::write(m.join("file.json"), &a.content).unwrap();
        assert_eq!(
            inspect(m, "linked.json", Look::Annotations),
            OnDisk::NotAFile("symbolic link")
        );
        assert_eq!(
            inspect(m, "dangling.json", Look::Kind),
            OnDisk::NotAFile("symbolic link")
        );
        assert_eq!(
            inspect(m, "dir.json", Look::Kind),
            OnDisk::NotAFile("directory")
        );
        assert_eq!(inspect(m, "absent.json", Look::Content), OnDisk::Absent);
        assert_eq!(
            inspect(m, "file.json", Look::Annotations),
            OnDisk::File {
                sha256: Some(a.sha256()),
                managed_by: Some("default/edge01".into()),
            }
        );
        assert_eq!(
            inspect(m, "file.json", Look::Content),
            OnDisk::File {
                sha256: Some(a.sha256()),
                managed_by: None,
            }
        );
        assert_eq!(
            inspect(m, "file.json", Look::Kind),
            OnDisk::File {
                sha256: None,
                managed_by: None,
            }
        );
        // Neither writing nor removing goes through a link or into a directory.
        for name in ["linked.json", "dangling.json", "dir.json"] {
            assert!(write(m, name, &a.content).is_err(), "{name}");
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
