//! The heads' own document (key [`KEY`]), replicated among heads only: which key each edge was
//! last issued (so an edge joined through one head is let in by every other, and `node remove`
//! on any head shuts it out everywhere) and which head each edge is connected to (so the writer
//! head reports edges connected to the others as online).
//!
//! ```text
//! nodes:    { <edge>: { key: <hex SHA-256 of its public key>, notAfter: <unix s>, removed,
//!                       version: <edgesync version it last said> } }
//! presence: { <edge>: <head name> }
//! addresses: { <edge>: <IP address it is reachable at> }   last known, kept when it leaves
//! dns:      { <edge>: <IP address in its DNS record> }       what the writer head published
//! tokens:   { <id>: { hash: <hex SHA-256 of the secret>, expires: <unix s> } }   join tokens
//! ```

use crate::model::{ModelError, reconcile};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ROOT, ReadDoc, Value as AmValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

pub use crate::key::{REGISTRY as KEY, is_internal};

/// What the heads know about one edge's certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// SHA-256 of the public key last issued to the edge, hex.
    pub key: String,
    /// When that certificate expires (unix seconds).
    pub not_after: i64,
    /// Removed with `edgesync node remove` (kept as a tombstone so the removal replicates).
    #[serde(default)]
    pub removed: bool,
}

/// The registry read out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    /// Registrations by edge name.
    pub nodes: BTreeMap<String, Registration>,
    /// Head each edge is connected to, by edge name.
    pub presence: BTreeMap<String, String>,
    /// Join tokens by id, so an edge may join through any head.
    pub tokens: BTreeMap<String, Token>,
    /// Last known reachable address of each edge.
    pub addresses: BTreeMap<String, std::net::IpAddr>,
    /// Address in each edge's DNS record, as published.
    pub dns: BTreeMap<String, std::net::IpAddr>,
    /// The edgesync version each edge last said it runs.
    pub versions: BTreeMap<String, String>,
}

impl Registry {
    /// The edges whose presence or registration differs in `before`, an earlier reading.
    pub fn moved_since(&self, before: &Registry) -> BTreeSet<String> {
        let names = before.presence.keys().chain(self.presence.keys());
        let names = names.chain(before.nodes.keys()).chain(self.nodes.keys());
        names
            .filter(|name| {
                before.presence.get(*name) != self.presence.get(*name)
                    || before.nodes.get(*name) != self.nodes.get(*name)
            })
            .cloned()
            .collect()
    }
}

/// Records the edgesync version registered edge `name` says it runs (kept in its registration,
/// which a new one replaces). Returns whether it changed.
pub fn set_version(doc: &mut AutoCommit, name: &str, version: &str) -> Result<bool, ModelError> {
    let nodes = map(doc, "nodes")?;
    let Some((AmValue::Object(ObjType::Map), entry)) = doc.get(&nodes, name)? else {
        return Ok(false);
    };
    let changed = reconcile(doc, &entry, "version".into(), &Value::from(version))?;
    doc.commit();
    Ok(changed)
}

/// Records the address edge `name` is reachable at. Returns whether it changed.
pub fn set_address(
    doc: &mut AutoCommit,
    name: &str,
    address: std::net::IpAddr,
) -> Result<bool, ModelError> {
    let addresses = map(doc, "addresses")?;
    let changed = reconcile(
        doc,
        &addresses,
        name.into(),
        &Value::from(address.to_string()),
    )?;
    doc.commit();
    Ok(changed)
}

/// Records what edge `name`'s DNS record now holds (None: there is none).
pub fn set_published(
    doc: &mut AutoCommit,
    name: &str,
    address: Option<std::net::IpAddr>,
) -> Result<bool, ModelError> {
    let dns = map(doc, "dns")?;
    let changed = match address {
        Some(ip) => reconcile(doc, &dns, name.into(), &Value::from(ip.to_string()))?,
        None if doc.get(&dns, name)?.is_some() => {
            doc.delete(&dns, name)?;
            true
        }
        None => false,
    };
    doc.commit();
    Ok(changed)
}

/// A join token as the heads share it: never the secret itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// Expiry (unix seconds).
    pub expires: i64,
}

/// Records join token `id`, and forgets expired ones. Returns whether anything changed.
pub fn set_token(
    doc: &mut AutoCommit,
    id: &str,
    token: &Token,
    now: i64,
) -> Result<bool, ModelError> {
    let tokens = map(doc, "tokens")?;
    let mut changed = false;
    for (old, t) in read(doc).tokens {
        if t.expires < now {
            doc.delete(&tokens, old.as_str())?;
            changed = true;
        }
    }
    let value = serde_json::to_value(token).unwrap_or(Value::Null);
    changed |= reconcile(doc, &tokens, id.into(), &value)?;
    doc.commit();
    Ok(changed)
}

/// The registry's deterministic first change (the same on every head, so their top-level
/// maps are one), continuing as `actor`.
pub fn genesis(actor: &ActorId) -> AutoCommit {
    let mut doc = AutoCommit::new();
    let seed: [u8; 32] = Sha256::digest(format!("edgesync genesis v1 {KEY}")).into();
    doc.set_actor(ActorId::from(&seed[..16]));
    for map in ["nodes", "presence", "tokens", "addresses", "dns"] {
        doc.put_object(ROOT, map, ObjType::Map)
            .expect("genesis operations on a fresh document cannot fail");
    }
    doc.commit_with(CommitOptions::default().with_time(0));
    doc.set_actor(actor.clone());
    doc
}

fn map(doc: &AutoCommit, name: &str) -> Result<ObjId, ModelError> {
    match doc.get(ROOT, name)? {
        Some((AmValue::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(ModelError::Malformed {
            key: KEY.into(),
            what: format!("{name} missing"),
        }),
    }
}

/// Records `registration` for edge `name`. Returns whether anything changed.
pub fn set_registration(
    doc: &mut AutoCommit,
    name: &str,
    registration: &Registration,
) -> Result<bool, ModelError> {
    let nodes = map(doc, "nodes")?;
    let value = serde_json::to_value(registration).unwrap_or(Value::Null);
    let changed = reconcile(doc, &nodes, name.into(), &value)?;
    doc.commit();
    Ok(changed)
}

/// The head edge `name` is connected to, read without reading the whole registry.
pub fn presence_of(doc: &AutoCommit, name: &str) -> Option<String> {
    let presence = map(doc, "presence").ok()?;
    match doc.get(&presence, name).ok()?? {
        (AmValue::Scalar(s), _) => s.as_str().map(str::to_string),
        _ => None,
    }
}

/// Records that edge `name` is connected to `head`, or (None) no longer to `me`.
pub fn set_presence(
    doc: &mut AutoCommit,
    name: &str,
    head: Option<&str>,
    me: &str,
) -> Result<bool, ModelError> {
    let presence = map(doc, "presence")?;
    let changed = match head {
        Some(head) => reconcile(doc, &presence, name.into(), &Value::from(head))?,
        None if presence_of(doc, name).as_deref() == Some(me) => {
            doc.delete(&presence, name)?;
            true
        }
        None => false,
    };
    doc.commit();
    Ok(changed)
}

/// Reads the registry; entries that do not parse are skipped.
pub fn read(doc: &AutoCommit) -> Registry {
    let json = serde_json::to_value(automerge::AutoSerde::from(doc)).unwrap_or_default();
    let entries = |name: &str| {
        json[name]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    Registry {
        nodes: entries("nodes")
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
            .collect(),
        presence: entries("presence")
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect(),
        tokens: entries("tokens")
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
            .collect(),
        addresses: ips(entries("addresses")),
        dns: ips(entries("dns")),
        versions: entries("nodes")
            .into_iter()
            .filter_map(|(k, v)| Some((k, v["version"].as_str()?.to_string())))
            .collect(),
    }
}

fn ips(entries: Vec<(String, Value)>) -> BTreeMap<String, std::net::IpAddr> {
    entries
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_edges_whose_presence_or_registration_moved_are_looked_at_again() {
        let mut before = Registry::default();
        for edge in ["edge01", "edge02", "edge03"] {
            before.presence.insert(edge.into(), "head-1".into());
        }
        let mut after = before.clone();
        after.presence.remove("edge01");
        after.presence.insert("edge02".into(), "head-2".into());
        after.presence.insert("edge04".into(), "head-1".into());
        after.versions.insert("edge03".into(), "1.2.0".into());
        let moved: Vec<String> = after.moved_since(&before).into_iter().collect();
        assert_eq!(moved, ["edge01", "edge02", "edge04"]);
        assert!(after.moved_since(&after).is_empty());
    }

    fn registration(key: &str) -> Registration {
        Registration {
            key: key.into(),
            not_after: 10,
            removed: false,
        }
    }

    #[test]
    fn two_heads_registering_different_edges_keep_both() {
        let mut a = genesis(&ActorId::random());
        let mut b = genesis(&ActorId::random());
        set_registration(&mut a, "edge01", &registration("aa")).unwrap();
        set_registration(&mut b, "edge02", &registration("bb")).unwrap();
        set_presence(&mut b, "edge02", Some("head-b"), "head-b").unwrap();
        a.merge(&mut b).unwrap();
        let merged = read(&a);
        assert_eq!(merged.nodes.len(), 2);
        assert_eq!(merged.nodes["edge02"].key, "bb");
        assert_eq!(merged.presence["edge02"], "head-b");
    }

    #[test]
    fn an_edge_version_is_kept_with_its_registration_and_goes_with_a_new_one() {
        let mut doc = genesis(&ActorId::random());
        assert!(
            !set_version(&mut doc, "edge01", "0.1.0").unwrap(),
            "not registered"
        );
        set_registration(&mut doc, "edge01", &registration("aa")).unwrap();
        assert!(set_version(&mut doc, "edge01", "0.1.0+abc").unwrap());
        assert!(!set_version(&mut doc, "edge01", "0.1.0+abc").unwrap());
        assert_eq!(read(&doc).versions["edge01"], "0.1.0+abc");
        assert_eq!(read(&doc).nodes["edge01"], registration("aa"));
        set_registration(&mut doc, "edge01", &registration("bb")).unwrap();
        assert!(read(&doc).versions.is_empty());
    }

    #[test]
    fn presence_is_cleared_only_by_the_head_that_holds_it() {
        let mut doc = genesis(&ActorId::random());
        set_presence(&mut doc, "edge01", Some("head-b"), "head-b").unwrap();
        assert!(!set_presence(&mut doc, "edge01", None, "head-a").unwrap());
        assert!(set_presence(&mut doc, "edge01", None, "head-b").unwrap());
        assert!(read(&doc).presence.is_empty());
    }
}
