//! Static pod manifests: pure rendering and planning, plus the thin IO that writes files
//! atomically and removes only files edgesync owns.

use crate::crd::{MANAGED_ANNOTATION, MANAGED_LABEL, SOURCE_ANNOTATION};
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
    /// Owned files no longer desired, still holding edgesync's content: delete them.
    pub remove: Vec<OwnedFile>,
    /// Owned files no longer desired whose content someone replaced with their own: forget
    /// them but leave the file.
    pub disown: Vec<OwnedFile>,
    /// Desired files whose name is taken by a file edgesync did not write.
    pub blocked: Vec<Desired>,
}

/// A file as found in the manifest directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDisk {
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// The EdgeNode key in its annotations, if it is marked as managed by edgesync.
    pub managed_by: Option<String>,
}

/// Plans the changes. `on_disk` inspects a file (None if absent). `keep` lists owned files to
/// leave alone although not desired (pods refused after being applied keep their previous
/// manifest). A file edgesync has no record of is adopted only if it carries edgesync's
/// annotations for the same EdgeNode (a state dir that was lost); otherwise it blocks the pod.
pub fn plan(
    desired: &[Desired],
    owned: &[OwnedFile],
    keep: &[String],
    on_disk: impl Fn(&str) -> Option<OnDisk>,
) -> Plan {
    let owned_by_file: BTreeMap<&str, &OwnedFile> =
        owned.iter().map(|o| (o.file.as_str(), o)).collect();
    let mut plan = Plan::default();
    for want in desired {
        let ours = owned_by_file.contains_key(want.file.as_str());
        match on_disk(&want.file) {
            Some(found) if !ours && found.managed_by.as_deref() != Some(want.key.as_str()) => {
                plan.blocked.push(want.clone())
            }
            Some(found) if found.sha256 == want.sha256() && ours => {}
            _ => plan.write.push(want.clone()),
        }
    }
    for file in owned {
        let wanted = desired.iter().any(|d| d.file == file.file);
        if wanted || keep.contains(&file.file) {
            continue;
        }
        match on_disk(&file.file) {
            Some(found) if found.sha256 != file.sha256 && found.managed_by.is_none() => {
                plan.disown.push(file.clone())
            }
            _ => plan.remove.push(file.clone()),
        }
    }
    plan
}

/// Inspects a file in `dir`: None if it does not exist or cannot be read.
pub fn inspect(dir: &Path, file: &str) -> Option<OnDisk> {
    let bytes = std::fs::read(path_in(dir, file)?).ok()?;
    let annotations = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .map(|v| v["metadata"]["annotations"].clone());
    let managed_by = annotations
        .filter(|a| a[MANAGED_ANNOTATION] == "true")
        .and_then(|a| a[SOURCE_ANNOTATION].as_str().map(str::to_string));
    Some(OnDisk {
        sha256: sha256_hex(&bytes),
        managed_by,
    })
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

    fn found(sha: &str, managed_by: Option<&str>) -> Option<OnDisk> {
        Some(OnDisk {
            sha256: sha.to_string(),
            managed_by: managed_by.map(str::to_string),
        })
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
        assert_eq!(plan_.blocked, vec![b]);
        assert_eq!(plan_.remove, vec![gone.clone()]);
        let drifted = plan(std::slice::from_ref(&a), &[owned(&a)], &[], |_| {
            found("edited", None)
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
    fn plan_adopts_own_files_after_state_loss_and_spares_replaced_ones() {
        let a = Desired::render("default", "edge01", "web", &pod("nginx"));
        let adopted = plan(std::slice::from_ref(&a), &[], &[], |_| {
            found("old", Some("default/edge01"))
        });
        assert_eq!(adopted.write, vec![a.clone()]);
        let other_node = plan(std::slice::from_ref(&a), &[], &[], |_| {
            found("old", Some("default/edge02"))
        });
        assert_eq!(other_node.blocked, vec![a.clone()]);
        let replaced = plan(&[], &[owned(&a)], &[], |_| found("someone else's", None));
        assert_eq!((replaced.remove.len(), replaced.disown.len()), (0, 1));
        let edited_but_ours = plan(&[], &[owned(&a)], &[], |_| {
            found("edited", Some("default/edge01"))
        });
        assert_eq!(edited_but_ours.remove, vec![owned(&a)]);
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
