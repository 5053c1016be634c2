//! Static pod manifests: pure rendering and planning, plus the thin IO that writes files
//! atomically and removes only files edgesync owns.

use crate::crd::{MANAGED_ANNOTATION, SOURCE_ANNOTATION};
use crate::store::OwnedFile;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    /// to the EdgeNode's, and it is annotated as managed by edgesync.
    pub fn render(namespace: &str, edgenode: &str, pod_name: &str, pod: &Value) -> Desired {
        let key = format!("{namespace}/{edgenode}");
        let mut pod = pod.clone();
        if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String(namespace.to_string()));
            let annotations = meta
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(annotations) = annotations.as_object_mut() {
                annotations.insert(MANAGED_ANNOTATION.into(), Value::String("true".into()));
                annotations.insert(SOURCE_ANNOTATION.into(), Value::String(key.clone()));
            }
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

/// `edgesync_<namespace>_<pod>.json`: `_` never occurs in DNS-1123 names, so names never clash.
pub fn file_name(namespace: &str, pod: &str) -> String {
    format!("edgesync_{namespace}_{pod}.json")
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `dir/file` if `file` is a plain file name that cannot leave `dir`.
pub fn path_in(dir: &Path, file: &str) -> Option<PathBuf> {
    let plain = !file.is_empty()
        && !file.starts_with('.')
        && !file.contains('/')
        && !file.contains('\\')
        && !file.contains('\0');
    plain.then(|| dir.join(file))
}

/// What to do to reach the desired files.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Files to (re)write: missing, changed in the spec, or edited by hand.
    pub write: Vec<Desired>,
    /// Owned files no longer desired.
    pub remove: Vec<OwnedFile>,
    /// Desired files whose name is taken by a file edgesync did not write: (pod key, pod, file).
    pub blocked: Vec<Desired>,
}

/// Plans the changes. `on_disk` gives the SHA-256 of a file's current content (None if absent);
/// `keep` lists owned files to leave alone although not desired (pods refused after being
/// applied keep their previous manifest).
pub fn plan(
    desired: &[Desired],
    owned: &[OwnedFile],
    keep: &[String],
    on_disk: impl Fn(&str) -> Option<String>,
) -> Plan {
    let owned_by_file: BTreeMap<&str, &OwnedFile> =
        owned.iter().map(|o| (o.file.as_str(), o)).collect();
    let mut plan = Plan::default();
    for want in desired {
        let current = on_disk(&want.file);
        match (owned_by_file.get(want.file.as_str()), current) {
            (None, Some(_)) => plan.blocked.push(want.clone()),
            (_, Some(sha)) if sha == want.sha256() => {}
            _ => plan.write.push(want.clone()),
        }
    }
    for file in owned {
        let wanted = desired.iter().any(|d| d.file == file.file);
        if !wanted && !keep.contains(&file.file) {
            plan.remove.push(file.clone());
        }
    }
    plan
}

/// Reads a file's SHA-256, None if it does not exist or cannot be read.
pub fn disk_sha(dir: &Path, file: &str) -> Option<String> {
    let path = path_in(dir, file)?;
    std::fs::read(path).ok().map(|bytes| sha256_hex(&bytes))
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
        assert_eq!(
            v["metadata"]["annotations"][SOURCE_ANNOTATION],
            "team-a/edge01"
        );
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
                (f == a.file)
                    .then(|| a_sha.clone())
                    .or((f == b.file).then(|| "foreign".to_string()))
            },
        );
        assert!(plan_.write.is_empty());
        assert_eq!(plan_.blocked, vec![b]);
        assert_eq!(plan_.remove, vec![gone.clone()]);
        let drifted = plan(std::slice::from_ref(&a), &[owned(&a)], &[], |_| {
            Some("edited".into())
        });
        assert_eq!(drifted.write, vec![a.clone()]);
        let kept = plan(
            &[],
            std::slice::from_ref(&gone),
            std::slice::from_ref(&gone.file),
            |_| None,
        );
        assert!(kept.remove.is_empty());
    }

    #[test]
    fn only_plain_names_are_joined() {
        let dir = Path::new("/m");
        assert_eq!(
            path_in(dir, "edgesync_a_b.json"),
            Some(PathBuf::from("/m/edgesync_a_b.json"))
        );
        for bad in ["", "../x", "a/b", ".hidden", ".."] {
            assert_eq!(path_in(dir, bad), None, "{bad}");
        }
    }
}
