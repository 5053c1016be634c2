//! What input may cost: the limits on EdgeNode text and objects, the scan that enforces the
//! YAML budgets before anything is built, and how a refusal shows a value without echoing it.

use super::{InvalidInput, NameError, invalid, one_line};
use serde_json::Value;
use std::collections::HashMap;

/// Largest text one apply takes (all its documents), in bytes.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Largest EdgeNode: its `spec` as compact JSON, in bytes.
pub const MAX_EDGENODE_BYTES: usize = 512 << 10;
/// Most history one EdgeNode's document holds, in bytes of changes: an edge that has none of
/// it receives it in one sync message, which carries at most
/// [`MAX_SYNC_MESSAGE`](crate::sync::wire::MAX_SYNC_MESSAGE) bytes.
pub const MAX_HISTORY_BYTES: usize = 48 << 20;
/// Most pods one EdgeNode holds (the kubelet's default `--max-pods`).
pub const MAX_PODS: usize = 110;
/// Longest file name the edge's manifest directory can hold (NAME_MAX of Linux file systems).
pub const MAX_FILE_NAME: usize = 255;
/// The manifest file of pod `pod` of an EdgeNode in `namespace`:
/// `edgesync_<namespace>_<pod>.json` (`_` never occurs in DNS-1123 names, so names never clash).
pub fn manifest_file_name(namespace: &str, pod: &str) -> String {
    format!("edgesync_{namespace}_{pod}.json")
}

/// Most YAML nodes (scalars, sequences, mappings) in one apply's text, aliases expanded.
pub const MAX_NODES: usize = 50_000;
/// Deepest nesting of sequences and mappings (a Pod needs about 20).
pub const MAX_DEPTH: usize = 48;
/// Most YAML anchors (`&name`) in one apply's text.
pub const MAX_ANCHORS: usize = 10_000;
/// Most documents (`---`) in one apply's text.
pub const MAX_DOCUMENTS: usize = 500;
/// How much of a value a message shows.
const SHOW_CHARS: usize = 64;

/// Walks the YAML event stream of `text` without building anything, and refuses it when it
/// exceeds what real EdgeNodes need: [`MAX_NODES`] nodes once aliases are expanded (the size of
/// each anchor is counted, never expanded), [`MAX_DEPTH`] levels, [`MAX_DOCUMENTS`] documents,
/// [`MAX_ANCHORS`] anchors. Only a text within these budgets is then deserialized, so a refused
/// one costs no more memory than its events.
pub fn check_budget(text: &str) -> Result<(), InvalidInput> {
    use serde_saphyr::granit_parser::{Event, Options, Parser};
    let mut options = Options::default();
    // One level beyond the budget, so that the budget reports it.
    options.flow_nesting_limit = MAX_DEPTH + 1;
    options.block_nesting_limit = MAX_DEPTH + 1;
    options.emit_comments = false;
    let refuse = |limit: String, line: usize| {
        invalid(
            "input",
            "(size)",
            &format!("{limit} (line {line}), more than EdgeNodes need; see Limits in the README"),
        )
    };
    // The expanded size of each anchor; per open collection: its anchor and the node count
    // when it started.
    let mut anchors: HashMap<usize, usize> = HashMap::new();
    let mut open: Vec<(usize, usize)> = Vec::new();
    let (mut nodes, mut documents) = (0usize, 0usize);
    for event in Parser::new_from_str_with_options(text, options) {
        let (event, span) = event.map_err(scan_error)?;
        let line = span.start.line();
        match event {
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > MAX_DOCUMENTS {
                    return Err(refuse(format!("more than {MAX_DOCUMENTS} documents"), line));
                }
            }
            Event::Scalar(value, _, anchor, _) => {
                if value.len() > MAX_EDGENODE_BYTES {
                    return Err(refuse(
                        format!(
                            "a value of {} bytes, more than an EdgeNode holds",
                            value.len()
                        ),
                        line,
                    ));
                }
                nodes += 1;
                if anchor != 0 {
                    anchors.insert(anchor, 1);
                }
            }
            Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) => {
                nodes += 1;
                open.push((anchor, nodes));
                if open.len() > MAX_DEPTH {
                    return Err(refuse(
                        format!("nested deeper than {MAX_DEPTH} levels"),
                        line,
                    ));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = open.pop()
                    && anchor != 0
                {
                    anchors.insert(anchor, nodes - start + 1);
                }
            }
            Event::Alias(anchor) => {
                // An alias of a collection still open is recursive; deserializing refuses it.
                nodes = nodes.saturating_add(anchors.get(&anchor).copied().unwrap_or(1));
                if nodes > MAX_NODES {
                    return Err(refuse(
                        format!("YAML aliases that expand to more than {MAX_NODES} nodes"),
                        line,
                    ));
                }
            }
            _ => {}
        }
        if nodes > MAX_NODES {
            return Err(refuse(format!("more than {MAX_NODES} YAML nodes"), line));
        }
        if anchors.len() > MAX_ANCHORS {
            return Err(refuse(
                format!("more than {MAX_ANCHORS} YAML anchors"),
                line,
            ));
        }
    }
    Ok(())
}

/// The documents of `text` when it is JSON objects, one per `---` line (what the CLI sends),
/// within the budgets: read without the YAML parser. None for anything else, a duplicate key
/// or a budget exceeded included: the YAML path then reads it, and says what is wrong.
pub fn json_documents(text: &str) -> Option<Vec<Value>> {
    let mut docs = Vec::new();
    for piece in text.split("\n---\n") {
        let piece = piece.trim();
        if !piece.starts_with('{') || docs.len() == MAX_DOCUMENTS {
            return None;
        }
        // serde_json's own recursion limit (128) ends deeper nesting first.
        let Strict(doc) = serde_json::from_str(piece).ok()?;
        docs.push(doc);
    }
    let mut nodes = 0;
    docs.iter()
        .all(|doc| within_budget(doc, 1, &mut nodes))
        .then_some(docs)
}

/// Whether `value`, at nesting level `depth`, keeps within the budgets [`check_budget`]
/// enforces on YAML; `nodes` counts as it goes (a key is a node, as in YAML).
fn within_budget(value: &Value, depth: usize, nodes: &mut usize) -> bool {
    *nodes += 1;
    if *nodes > MAX_NODES {
        return false;
    }
    match value {
        Value::Object(map) => {
            depth <= MAX_DEPTH
                && map.iter().all(|(key, v)| {
                    *nodes += 1;
                    key.len() <= MAX_EDGENODE_BYTES && within_budget(v, depth + 1, nodes)
                })
        }
        Value::Array(items) => {
            depth <= MAX_DEPTH && items.iter().all(|v| within_budget(v, depth + 1, nodes))
        }
        Value::String(s) => s.len() <= MAX_EDGENODE_BYTES,
        _ => true,
    }
}

/// A JSON value that refuses duplicate keys, as the YAML path does.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if out.insert(key, value).is_some() {
                return Err(serde::de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(out))
    }
}

/// A syntax error of the YAML parser, as one line; the parser's own nesting limit (hit in flow
/// collections such as `[[[`) reads as the depth budget.
fn scan_error(e: serde_saphyr::granit_parser::ScanError) -> InvalidInput {
    use serde_saphyr::granit_parser::ErrorKind;
    let at = format!("line {} column {}", e.marker().line(), e.marker().col() + 1);
    match e.kind() {
        ErrorKind::RecursionLimitExceeded => invalid(
            "input",
            "(size)",
            &format!(
                "nested deeper than {MAX_DEPTH} levels ({at}), more than EdgeNodes need; see Limits in the README"
            ),
        ),
        _ => invalid(
            "input",
            "(syntax)",
            &format!("not valid YAML or JSON: {} at {at}", one_line(&e.info())),
        ),
    }
}

/// Checks that the static pod manifest of pod `pod` in `namespace` has a file name the edge's
/// manifest directory can hold (at most [`MAX_FILE_NAME`] bytes).
pub fn check_manifest_name(namespace: &str, pod: &str) -> Result<(), NameError> {
    let file = manifest_file_name(namespace, pod);
    if file.len() <= MAX_FILE_NAME {
        return Ok(());
    }
    Err(NameError::ManifestFileName {
        namespace: namespace.to_string(),
        pod: pod.to_string(),
        file_bytes: file.len(),
        fits: MAX_FILE_NAME.saturating_sub(manifest_file_name(namespace, "").len()),
    })
}

/// A value for a message, quoted: at most 64 characters of it, then how long it was, so a
/// huge value is never echoed whole.
pub fn show(value: &str) -> String {
    match value.char_indices().nth(SHOW_CHARS) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

/// A JSON value for a message, as [`show`] does: strings quoted, anything else as JSON.
pub(super) fn show_json(value: &Value) -> String {
    match value {
        Value::String(s) => show(s),
        other => {
            let json = other.to_string();
            clip(&json)
        }
    }
}

/// Text made of input (a field path with the input's keys, another library's message) as it
/// may go into a one-line message: control characters escaped (`\n`, `\u{1b}`), cut to a few
/// hundred characters, saying how long it was.
pub fn clip(text: &str) -> String {
    let end = text
        .char_indices()
        .nth(4 * SHOW_CHARS)
        .map_or(text.len(), |(end, _)| end);
    let mut clipped = String::with_capacity(end);
    for c in text[..end].chars() {
        match c.is_control() {
            true => clipped.extend(c.escape_default()),
            false => clipped.push(c),
        }
    }
    if end < text.len() {
        clipped.push_str(&format!("… ({} bytes)", text.len()));
    }
    clipped
}

/// The length of `value` as compact JSON, without building the text.
pub(super) fn json_len<T: serde::Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{Rules, parse_edgenodes};

    fn refusal(text: &str) -> String {
        parse_edgenodes(text, &Rules::new("default"))
            .unwrap_err()
            .to_string()
    }

    /// Nine levels of nine aliases: 9^9 nodes if expanded.
    fn alias_bomb() -> String {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn hostile_yaml_is_refused_while_parsing_within_budgets() {
        let anchored = format!("b: &b [{}]\n", vec!["x"; 100].join(", "));
        let moderate = format!("{anchored}c: [{}]\n", vec!["*b"; 1000].join(", "));
        let cases = [
            (alias_bomb(), "aliases"),
            // 100,000 nodes from 1,100: under the parser's own default limits.
            (moderate, "aliases"),
            ("[".repeat(10_000), "nested deeper than"),
            ("- x\n".repeat(MAX_NODES + 1), "YAML nodes"),
            ("---\na: 1\n".repeat(MAX_DOCUMENTS + 1), "documents"),
        ];
        for (text, expected) in cases {
            let started = std::time::Instant::now();
            let message = refusal(&text);
            assert!(
                message.starts_with("input: (size): ") && message.contains(expected),
                "{message:?} should name the limit {expected:?}"
            );
            assert!(message.len() < 200, "{message}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        }
        // A few anchors, as people use them for shared settings, are fine.
        let shared = crate::input::tests::with_pods(
            "    - metadata: {name: a}\n      spec: {containers: [&c {name: c, image: nginx}]}\n    - metadata: {name: b}\n      spec: {containers: [*c]}\n",
        );
        assert_eq!(
            parse_edgenodes(&shared, &Rules::new("default")).unwrap()[0]
                .pods
                .len(),
            2
        );
    }
}
