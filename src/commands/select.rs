//! What `get` picks and prints: label selectors (`-l`) and JSONPath templates
//! (`-o jsonpath=…`), read as kubectl reads them.

use serde_json::Value;
use serde_json_path::JsonPath;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// `key=value`, `key==value`, `key in (a,b)`.
    In(String, Vec<String>),
    /// `key!=value`, `key notin (a,b)`: also true when the label is absent.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    Absent(String),
}

/// A label selector such as `app=web,tier!=db,env in (prod,test),!canary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// Reads `text`; the error says which part is wrong.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let bad = || format!("{part:?} is not a label requirement");
            let check = |key: &str| match label_name(key.rsplit('/').next().unwrap_or(key)) {
                true => Ok(key.to_string()),
                false => Err(format!("{key:?} is not a label key")),
            };
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::Absent(check(key.trim())?)
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotIn(check(key.trim())?, vec![value.trim().to_string()])
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                Requirement::In(check(key.trim())?, vec![value.trim().to_string()])
            } else if let Some((key, set)) = part.split_once(" notin ") {
                Requirement::NotIn(check(key.trim())?, values(set).ok_or_else(bad)?)
            } else if let Some((key, set)) = part.split_once(" in ") {
                Requirement::In(check(key.trim())?, values(set).ok_or_else(bad)?)
            } else if !part.is_empty() && !part.contains([' ', '(', ')']) {
                Requirement::Exists(check(part)?)
            } else {
                return Err(bad());
            };
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    /// Whether an object with `labels` (its `metadata.labels`) matches.
    pub fn matches(&self, labels: &Value) -> bool {
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::In(key, set) => label(key).is_some_and(|v| set.iter().any(|s| s == v)),
            Requirement::NotIn(key, set) => label(key).is_none_or(|v| !set.iter().any(|s| s == v)),
            Requirement::Exists(key) => label(key).is_some(),
            Requirement::Absent(key) => label(key).is_none(),
        })
    }
}

/// Whether `name` is the name part of a label key: 1 to 63 letters, digits, `-`, `_` and
/// `.`, starting and ending with a letter or digit.
fn label_name(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && edge(name.chars().next())
        && edge(name.chars().last())
}

/// The parts of a selector: split at commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// `(a, b)` as its values.
fn values(set: &str) -> Option<Vec<String>> {
    let inner = set.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

/// A kubectl JSONPath template such as `{.items[*].metadata.name}`.
#[derive(Debug)]
pub struct Template(JsonPath);

impl Template {
    /// Reads `text` (kubectl's braces and leading `.` allowed; `range` and literal text are
    /// not supported).
    pub fn parse(text: &str) -> Result<Template, String> {
        let inner = text.trim();
        let inner = inner
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(inner)
            .trim();
        if inner.starts_with("range") || inner.starts_with("end") || inner.contains(['{', '}']) {
            return Err(format!(
                "jsonpath {text:?}: one path only; range, end and literal text are not supported"
            ));
        }
        let path = match inner.strip_prefix('.') {
            Some(_) => format!("${inner}"),
            None if inner.starts_with('$') => inner.to_string(),
            None => format!("$.{inner}"),
        };
        JsonPath::parse(&path)
            .map(Template)
            .map_err(|e| format!("jsonpath {text:?}: {e}"))
    }

    /// What the template selects from `value`, as kubectl prints it: values separated by
    /// spaces, strings as they are, the rest as JSON.
    pub fn render(&self, value: &Value) -> String {
        let shown: Vec<String> = self
            .0
            .query(value)
            .all()
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        shown.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match_as_kubectl_does() {
        let labels = json!({"app": "web", "tier": "front", "edgesync.io/site": "north"});
        let yes = [
            "app=web",
            "app==web,tier",
            "tier!=db",
            "env!=prod",
            "app in (web, api)",
            "app notin (db)",
            "!canary",
            "edgesync.io/site=north",
            "",
        ];
        for text in yes {
            assert!(Selector::parse(text).unwrap().matches(&labels), "{text}");
        }
        let no = [
            "app=api",
            "canary",
            "!app",
            "tier in (back)",
            "tier notin (front)",
        ];
        for text in no {
            assert!(!Selector::parse(text).unwrap().matches(&labels), "{text}");
        }
        for bad in ["app in web", "a b", "=x", "-bad=x"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_read_kubectl_jsonpath() {
        let list = json!({"items": [
            {"metadata": {"name": "edge01"}, "status": {"phase": "Running"}},
            {"metadata": {"name": "edge02"}, "status": {"phase": "Offline"}},
        ]});
        let names = Template::parse("{.items[*].metadata.name}").unwrap();
        assert_eq!(names.render(&list), "edge01 edge02");
        let first = Template::parse("{.items[0].status}").unwrap();
        assert_eq!(first.render(&list), r#"{"phase":"Running"}"#);
        assert!(Template::parse("{range .items[*]}").is_err());
    }
}
