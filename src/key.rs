//! Document keys: `namespace/name` for an EdgeNode, whose edge is the one of that name, or the
//! key of a head-only document (starting with `_`, such as the heads' registry).

use crate::input::{check_label, check_subdomain, show};
use std::fmt;

/// Key of the heads' registry document. Its namespace is not a DNS label, so no EdgeNode has
/// it.
pub const REGISTRY: &str = "_heads/registry";

/// Whether `key` names a head-only document rather than an EdgeNode.
pub fn is_internal(key: &str) -> bool {
    key.starts_with('_')
}

/// The key of one document, valid by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocKey(String);

/// A text that is no document key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document key {key}: {reason}")]
pub struct KeyError {
    /// The key, clipped for a message.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl DocKey {
    /// The key of EdgeNode `namespace/name`, both checked as the API server checks them.
    pub fn new(namespace: &str, name: &str) -> Result<DocKey, KeyError> {
        check(namespace, name)?;
        Ok(DocKey(format!("{namespace}/{name}")))
    }

    /// Reads `key`: `namespace/name`, or a head-only document's key.
    pub fn parse(key: &str) -> Result<DocKey, KeyError> {
        split(key)?;
        Ok(DocKey(key.to_string()))
    }

    /// The heads' registry.
    pub fn registry() -> DocKey {
        DocKey(REGISTRY.to_string())
    }

    /// Whether it is a head-only document rather than an EdgeNode.
    pub fn is_internal(&self) -> bool {
        is_internal(&self.0)
    }

    /// The EdgeNode's namespace; None for a head-only document.
    pub fn namespace(&self) -> Option<&str> {
        self.parts().map(|(namespace, _)| namespace)
    }

    /// The EdgeNode's name; None for a head-only document.
    pub fn name(&self) -> Option<&str> {
        self.parts().map(|(_, name)| name)
    }

    /// The edge the document belongs to (the EdgeNode's name); None for a head-only document.
    pub fn edge(&self) -> Option<&str> {
        self.name()
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parts(&self) -> Option<(&str, &str)> {
        match self.is_internal() {
            true => None,
            false => self.0.split_once('/'),
        }
    }
}

/// The edge document `key` belongs to, if it is a valid EdgeNode key.
pub fn edge_of(key: &str) -> Option<&str> {
    split(key).ok()?.map(|(_, name)| name)
}

/// The namespace and name of EdgeNode key `key`; None for a head-only document or a text
/// that is no key.
pub fn parts(key: &str) -> Option<(&str, &str)> {
    split(key).ok().flatten()
}

/// Checks `key`; its namespace and name, or None for a head-only document.
fn split(key: &str) -> Result<Option<(&str, &str)>, KeyError> {
    if key == REGISTRY {
        return Ok(None);
    }
    let Some((namespace, name)) = key.split_once('/') else {
        return Err(KeyError {
            key: show(key),
            reason: "not namespace/name".into(),
        });
    };
    check(namespace, name)?;
    Ok(Some((namespace, name)))
}

fn check(namespace: &str, name: &str) -> Result<(), KeyError> {
    let refuse = |reason: String| KeyError {
        key: show(&format!("{namespace}/{name}")),
        reason,
    };
    check_label(namespace).map_err(|e| refuse(format!("namespace: {e}")))?;
    check_subdomain(name).map_err(|e| refuse(format!("name: {e}")))
}

impl crate::input::DesiredNode {
    /// The document key (namespace and name are checked when the EdgeNode is read).
    pub fn key(&self) -> DocKey {
        debug_assert!(check(&self.namespace, &self.name).is_ok());
        DocKey(format!("{}/{}", self.namespace, self.name))
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DocKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for DocKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<DocKey> for String {
    fn from(key: DocKey) -> String {
        key.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_checked_and_tell_their_edge() {
        let key = DocKey::parse("default/edge01").unwrap();
        assert_eq!(
            (key.namespace(), key.name(), key.edge()),
            (Some("default"), Some("edge01"), Some("edge01"))
        );
        assert_eq!(key.to_string(), "default/edge01");
        assert_eq!(key, DocKey::new("default", "edge01").unwrap());
        let registry = DocKey::parse(crate::registry::KEY).unwrap();
        assert!(registry.is_internal());
        assert_eq!((registry.namespace(), registry.edge()), (None, None));
        for bad in [
            "edge01",
            "Default/edge01",
            "default/../x",
            "default/a/b",
            "/x",
            "x/",
            "_other/x",
        ] {
            let error = DocKey::parse(bad).unwrap_err().to_string();
            assert!(error.starts_with("document key "), "{bad}: {error}");
        }
        let long = format!("default/{}", "a".repeat(10_000));
        assert!(DocKey::parse(&long).unwrap_err().to_string().len() < 400);
    }
}
