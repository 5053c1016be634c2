//! What must hold once a schedule has healed: no acknowledged edit lost, the head and each
//! edge holding the same EdgeNodes, the edge's report of each current spec back at the head,
//! each edge's manifest directory holding exactly its manifests beside untouched foreign
//! things, and nothing written outside it.
//!
//! "Superseded": each field (one pod of one EdgeNode: absent, or present with an image) ends
//! as the value set by the last acknowledged edit on the head or by the last on the edge, or
//! by an unacknowledged apply (killed mid-way: it may or may not have landed) after that last
//! on its side. A delete sets every pod absent (and hides the EdgeNode). A later edit on one
//! side supersedes that side's earlier ones; the head's and the edge's are taken as
//! concurrent, as the test cannot see when they synced, and concurrent edits of one field
//! resolve either way (Automerge's rule). With no acknowledged edit at all, the field may
//! still be absent.

use super::plan::{FOREIGN, ForeignKind, NAMESPACES, PODS, Side, Spec, doc_key, node_name};
use super::world::{Applied, World, cli};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What the documents must say.
pub enum Expect<'a> {
    /// Every acknowledged edit present or superseded.
    Acknowledged(&'a [Applied]),
    /// Exactly these EdgeNodes.
    Exactly(&'a [(Side, Spec)]),
}

/// One EdgeNode as `get -o json` shows it.
#[derive(Debug, PartialEq)]
struct Doc {
    /// Pod name -> image.
    pods: BTreeMap<String, String>,
    generation: Option<i64>,
    observed: Option<i64>,
}

/// Waits until everything holds; an error saying what still did not at `timeout`.
pub async fn wait_converged(
    world: &World,
    expect: &Expect<'_>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match converged(world, expect).await {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() >= deadline => {
                return Err(format!("not converged within {timeout:?}: {why}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Whether everything holds now; if not, the first thing that does not.
async fn converged(world: &World, expect: &Expect<'_>) -> Result<(), String> {
    let head = docs(world, Side::Head).await?;
    for (e, edge) in world.edges.iter().enumerate() {
        let on_edge = docs(world, Side::Edge(e)).await?;
        let suffix = format!("/{}", node_name(e));
        let pods = |docs: &BTreeMap<String, Doc>| -> BTreeMap<String, BTreeMap<String, String>> {
            docs.iter()
                .filter(|(k, _)| k.ends_with(&suffix))
                .map(|(k, d)| (k.clone(), d.pods.clone()))
                .collect()
        };
        let (on_head, mine) = (pods(&head), pods(&on_edge));
        if on_head != mine {
            return Err(format!(
                "head and {} differ: head {on_head:?}, edge {mine:?}",
                node_name(e)
            ));
        }
        manifests(world, e, &mine)?;
        for index in &edge.planted {
            foreign_intact(world, e, *index)?;
        }
    }
    for (key, doc) in &head {
        if doc.observed != doc.generation {
            return Err(format!(
                "{key}: generation {:?} but the edge's report is of {:?}",
                doc.generation, doc.observed
            ));
        }
    }
    let outside: Vec<_> = std::fs::read_dir(world.outside())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if outside != ["target.json"] {
        return Err(format!(
            "written outside the manifest directory: {outside:?}"
        ));
    }
    match expect {
        Expect::Acknowledged(applies) => acknowledged(&head, world.edges.len(), applies),
        Expect::Exactly(finals) => {
            let want: BTreeMap<String, &BTreeMap<String, String>> =
                finals.iter().map(|(_, s)| (s.key(), &s.pods)).collect();
            let got: BTreeMap<String, &BTreeMap<String, String>> =
                head.iter().map(|(k, d)| (k.clone(), &d.pods)).collect();
            match want == got {
                true => Ok(()),
                false => Err(format!(
                    "the last edits {want:?} are not what holds: {got:?}"
                )),
            }
        }
    }
}

/// The EdgeNodes `side` holds, by key.
async fn docs(world: &World, side: Side) -> Result<BTreeMap<String, Doc>, String> {
    let socket = world.socket(side).ok_or(format!("{side:?} is down"))?;
    let out = cli(&["get", "edgenodes", "-A", "-o", "json"], socket).await?;
    if !out.status.success() {
        return Err(format!(
            "get on {side:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let list: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Ok(items
        .iter()
        .map(|item| {
            let meta = &item["metadata"];
            let key = format!("{}/{}", text(&meta["namespace"]), text(&meta["name"]));
            let pods = item["spec"]["pods"].as_array().cloned().unwrap_or_default();
            let pods = pods
                .iter()
                .map(|p| {
                    let image = &p["spec"]["containers"][0]["image"];
                    (text(&p["metadata"]["name"]), text(image))
                })
                .collect();
            let doc = Doc {
                pods,
                generation: meta["generation"].as_i64(),
                observed: item["status"]["observedGeneration"].as_i64(),
            };
            (key, doc)
        })
        .collect())
}

/// Checks each pod of each EdgeNode against the applies (see the module's doc).
fn acknowledged(
    head: &BTreeMap<String, Doc>,
    edges: usize,
    applies: &[Applied],
) -> Result<(), String> {
    for edge in 0..edges {
        for namespace in NAMESPACES {
            let key = doc_key(namespace, edge);
            for pod in PODS {
                let now = head.get(&key).and_then(|d| d.pods.get(pod)).cloned();
                let allowed = allowed(applies, &key, pod);
                if !allowed.contains(&now) {
                    let edits: Vec<String> = applies
                        .iter()
                        .filter_map(|a| {
                            let spec = a.specs.iter().find(|s| s.key() == key)?;
                            let set = spec.pods.get(pod);
                            let acked = if a.acked {
                                "acknowledged"
                            } else {
                                "unacknowledged"
                            };
                            Some(format!(
                                "step {:?} on {:?} set {set:?} ({acked})",
                                a.step, a.on
                            ))
                        })
                        .collect();
                    return Err(format!(
                        "{key} pod {pod} is {now:?}, but the edits allow only {allowed:?}; edits: {edits:?}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The values pod `pod` of EdgeNode `key` may end with.
fn allowed(applies: &[Applied], key: &str, pod: &str) -> BTreeSet<Option<String>> {
    let mut allowed = BTreeSet::new();
    let mut any_acked = false;
    let sides: BTreeSet<Side> = applies.iter().map(|a| a.on).collect();
    for side in sides {
        let edits: Vec<(&Applied, &Spec)> = applies
            .iter()
            .filter(|a| a.on == side)
            .filter_map(|a| Some((a, a.specs.iter().find(|s| s.key() == key)?)))
            .collect();
        let last_acked = edits.iter().rposition(|(a, _)| a.acked);
        any_acked |= last_acked.is_some();
        for (_, spec) in &edits[last_acked.unwrap_or(0)..] {
            allowed.insert(spec.pods.get(pod).cloned());
        }
    }
    if !any_acked {
        allowed.insert(None);
    }
    allowed
}

/// Checks that edge `e`'s manifest directory holds exactly the manifests of `docs` (each with
/// its image) and the foreign things planted there.
fn manifests(
    world: &World,
    e: usize,
    docs: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<(), String> {
    let dirs = &world.edges[e].dirs;
    let mut want: BTreeMap<String, Option<(&str, &str, &str)>> = BTreeMap::new();
    for (key, pods) in docs {
        let namespace = key.split('/').next().unwrap_or_default();
        for (pod, image) in pods {
            let file = format!("edgesync_{namespace}_{pod}.json");
            want.insert(file, Some((namespace, pod.as_str(), image.as_str())));
        }
    }
    for index in &world.edges[e].planted {
        want.insert(FOREIGN[*index].0.to_string(), None);
    }
    let files = dirs.files();
    let wanted: Vec<&String> = want.keys().collect();
    if files.iter().collect::<Vec<_>>() != wanted {
        return Err(format!(
            "{}'s manifest directory holds {files:?}, not {wanted:?}",
            node_name(e)
        ));
    }
    for (file, manifest) in &want {
        let Some((namespace, pod, image)) = manifest else {
            continue;
        };
        let found = dirs.manifest(namespace, pod);
        let found_image = found.as_ref().map(crate::harness::image);
        let managed = found
            .as_ref()
            .map(|m| m["metadata"]["annotations"]["edgesync.io/managed"] == "true");
        if found_image != Some(image) || managed != Some(true) {
            return Err(format!(
                "{}'s {file} is {found:?}, not the manifest of image {image}",
                node_name(e)
            ));
        }
    }
    Ok(())
}

/// Checks that foreign thing `index` planted on edge `e` is as it was planted.
fn foreign_intact(world: &World, e: usize, index: usize) -> Result<(), String> {
    let (name, kind) = FOREIGN[index];
    let path = world.edges[e].dirs.manifests.join(name);
    let meta = std::fs::symlink_metadata(&path).map_err(|err| format!("{name}: {err}"))?;
    let link = || std::fs::read_link(&path).ok();
    let intact = match kind {
        ForeignKind::File(text) => {
            meta.is_file() && std::fs::read_to_string(&path).ok().as_deref() == Some(text)
        }
        ForeignKind::Link => {
            let target = world.link_target();
            link() == Some(target.clone())
                && std::fs::read_to_string(&target).ok().as_deref() == Some("outside")
        }
        ForeignKind::Dangling => {
            let target = world.dangling_target(e);
            link() == Some(target.clone()) && !target.exists()
        }
        ForeignKind::Dir => meta.is_dir(),
    };
    match intact {
        true => Ok(()),
        false => Err(format!(
            "{}: foreign {name} was touched ({meta:?})",
            node_name(e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apply on `on` setting pod web of default/edge01 to `image` (None: leaving it out).
    fn web(on: Side, image: Option<&str>, acked: bool) -> Applied {
        let pods = image.map(|i| ("web".to_string(), i.to_string()));
        Applied {
            on,
            step: None,
            specs: vec![Spec {
                namespace: "default".into(),
                edge: 0,
                pods: pods.into_iter().collect(),
            }],
            acked,
        }
    }

    /// What pod web of default/edge01 may end as after `applies`, in order.
    fn allowed_web(applies: &[Applied]) -> Vec<Option<String>> {
        allowed(applies, "default/edge01", "web")
            .into_iter()
            .collect()
    }

    fn values(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn a_later_edit_on_one_side_supersedes_that_sides_earlier_ones() {
        let (head, edge) = (Side::Head, Side::Edge(0));
        let applies = [web(head, Some("a"), true), web(head, Some("b"), true)];
        assert_eq!(allowed_web(&applies), values(&[Some("b")]));
        let applies = [web(head, Some("a"), true), web(head, None, true)];
        assert_eq!(allowed_web(&applies), values(&[None]));
        // The other side's last edit is concurrent: either may win.
        let applies = [web(head, Some("a"), true), web(edge, Some("b"), true)];
        assert_eq!(allowed_web(&applies), values(&[Some("a"), Some("b")]));
    }

    #[test]
    fn an_unacknowledged_edit_may_have_landed_unless_an_acknowledged_one_came_after() {
        let head = Side::Head;
        let applies = [web(head, Some("a"), true), web(head, Some("b"), false)];
        assert_eq!(allowed_web(&applies), values(&[Some("a"), Some("b")]));
        let applies = [web(head, Some("b"), false), web(head, Some("a"), true)];
        assert_eq!(allowed_web(&applies), values(&[Some("a")]));
        // Nothing acknowledged: it may also never have been set.
        let applies = [web(head, Some("b"), false)];
        assert_eq!(allowed_web(&applies), values(&[None, Some("b")]));
        assert_eq!(allowed_web(&[]), values(&[None]));
    }
}
