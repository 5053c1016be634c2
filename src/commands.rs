//! The CLI's client commands (apply, get, delete, status, token create): talk to the local
//! control socket and print for people (tables) or scripts (JSON, YAML).

mod select;

use crate::cli::{
    ApplyArgs, DeleteArgs, DescribeArgs, DiffArgs, DryRun, GetArgs, GetOutput, StatusArgs,
    StatusOutput, VersionArgs, VersionOutput,
};
use crate::control::{Client, ControlError};
use crate::node::{ApplyOutcome, StatusReport};
use hyper::{Method, StatusCode};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use std::io::Read;
use std::path::Path;

/// A command failed; `usage` errors exit with 2, others with 1.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad input or arguments (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The daemon has no such object (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// Everything is said; exit with this code (`diff` when something would change).
    #[error("exit {0}")]
    Exit(i32),
    /// Anything else (exit 1).
    #[error("{0}")]
    Runtime(String),
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::Usage(_) => 2,
            CommandError::NotFound(_) | CommandError::Runtime(_) => 1,
            CommandError::Exit(code) => *code,
        }
    }
}

impl From<ControlError> for CommandError {
    fn from(e: ControlError) -> Self {
        CommandError::Runtime(e.to_string())
    }
}

fn error_text(status: StatusCode, body: &[u8]) -> String {
    let text = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    if text.is_empty() {
        format!("the daemon answered {status} (is it a different edgesync version?)")
    } else {
        text
    }
}

/// The socket of the edge's systemd unit, apart from a head's default one on the same host.
pub const EDGE_UNIT_SOCKET: &str = "/run/edgesync-edge/edgesync.sock";

/// `socket`, or, when it is the default and absent but the edge unit's socket is there (an
/// edge installed by the package), the edge's.
fn resolve_socket(socket: &Path) -> std::path::PathBuf {
    let edge = Path::new(EDGE_UNIT_SOCKET);
    match socket == Path::new(crate::cli::DEFAULT_SOCKET) && !socket.exists() && edge.exists() {
        true => edge.to_path_buf(),
        false => socket.to_path_buf(),
    }
}

async fn call(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<Value, CommandError> {
    let socket = &resolve_socket(socket);
    let (status, body) = Client::new(socket).request(method, uri, body).await?;
    match status {
        s if s.is_success() => serde_json::from_slice(&body).map_err(|e| {
            CommandError::Runtime(format!("unreadable answer from {}: {e}", socket.display()))
        }),
        StatusCode::UNPROCESSABLE_ENTITY
        | StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE => Err(CommandError::Usage(error_text(status, &body))),
        StatusCode::NOT_FOUND => Err(CommandError::NotFound(error_text(status, &body))),
        _ => Err(CommandError::Runtime(error_text(status, &body))),
    }
}

fn check_resource(resource: &str) -> Result<(), CommandError> {
    match resource {
        "edgenodes" | "edgenode" | "en" | "edgenodes.edgesync.io" | "edgenode.edgesync.io" => {
            Ok(())
        }
        other => Err(CommandError::Usage(format!(
            "the server doesn't have a resource type {other:?}; use edgenodes"
        ))),
    }
}

/// The text of `file` (`-`: standard input), refused before anything is sent when it is larger
/// than `limit` bytes; `what` completes "more than the N bytes ...".
fn read_text(file: &Path, limit: usize, what: &str) -> Result<String, CommandError> {
    let name = file.display().to_string();
    let usage = |reason: String| CommandError::Usage(format!("{name}: {reason}"));
    let too_large = |size: Option<u64>| {
        let size = size.map(|s| format!("{s} bytes, ")).unwrap_or_default();
        usage(format!("{size}more than the {limit} bytes {what}"))
    };
    let mut reader: Box<dyn Read> = if name == "-" {
        Box::new(std::io::stdin())
    } else {
        let opened = std::fs::File::open(file).map_err(|e| usage(e.to_string()))?;
        match opened.metadata() {
            Ok(meta) if meta.is_file() && meta.len() > limit as u64 => {
                return Err(too_large(Some(meta.len())));
            }
            _ => Box::new(opened),
        }
    };
    let mut bytes = Vec::new();
    reader
        .by_ref()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| usage(e.to_string()))?;
    if bytes.len() > limit {
        return Err(too_large(None));
    }
    String::from_utf8(bytes).map_err(|_| usage("not UTF-8 text".into()))
}

/// `edgesync apply -f FILE`.
pub async fn apply(args: &ApplyArgs) -> Result<(), CommandError> {
    let name = args.file.display().to_string();
    let text = read_text(
        &args.file,
        crate::input::MAX_INPUT_BYTES,
        "one apply takes; split it into several files",
    )?;
    if args.dry_run == Some(DryRun::Client) {
        let rules = crate::input::Rules::new(&args.namespace);
        let nodes = crate::input::parse_edgenodes(&text, &rules)
            .map_err(|e| CommandError::Usage(format!("{name}: {e}")))?;
        for node in nodes {
            println!("edgenode.edgesync.io/{} checked (dry run)", node.name);
        }
        return Ok(());
    }
    // Sent as JSON, which the head reads without a YAML parser; refused here as it would be.
    let body = crate::input::for_the_wire(&text)
        .map_err(|e| CommandError::Usage(format!("{name}: {e}")))?;
    let server = args.dry_run == Some(DryRun::Server);
    let uri = format!("/v1/apply?namespace={}&dryRun={server}", args.namespace);
    let result = call(&args.socket, Method::POST, &uri, Some(body.into_bytes())).await;
    let outcomes: Vec<ApplyOutcome> = match result {
        Ok(v) => serde_json::from_value(v).map_err(|e| CommandError::Runtime(e.to_string()))?,
        Err(CommandError::Usage(message)) => {
            return Err(CommandError::Usage(format!("{name}: {message}")));
        }
        Err(e) => return Err(e),
    };
    for outcome in outcomes {
        let short = crate::key::edge_of(&outcome.key).unwrap_or(&outcome.key);
        let dry = if server { " (server dry run)" } else { "" };
        println!("edgenode.edgesync.io/{short} {}{dry}", outcome.result);
    }
    Ok(())
}

/// Prints `value` as indented JSON, as kubectl does.
fn print_json(value: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(value).expect("a JSON value prints");
    println!("{text}");
}

/// Prints `value` as YAML.
fn print_yaml(value: &impl serde::Serialize) -> Result<(), CommandError> {
    let text = serde_saphyr::to_string(value).map_err(|e| CommandError::Runtime(e.to_string()))?;
    print!("{text}");
    Ok(())
}

/// `edgesync node list` (also `edgesync get nodes`).
pub async fn node_list(socket: &Path, output: &GetOutput) -> Result<(), CommandError> {
    let template = template(output)?;
    let list = call(socket, Method::GET, "/v1/nodes", None).await?;
    match output {
        GetOutput::Json => print_json(&list),
        GetOutput::Yaml => print_yaml(&list)?,
        GetOutput::JsonPath(_) => println!("{}", template.expect("read above").render(&list)),
        GetOutput::Name => {
            for item in list.as_array().into_iter().flatten() {
                println!("node/{}", item["name"].as_str().unwrap_or_default());
            }
        }
        GetOutput::Table | GetOutput::Wide => {
            let items = list.as_array().cloned().unwrap_or_default();
            match items.is_empty() {
                true => eprintln!("No edges registered"),
                false => print!(
                    "{}",
                    node_table(&items, *output == GetOutput::Wide, Timestamp::now())
                ),
            }
        }
    }
    Ok(())
}

/// The `node list` table: one row per edge; `wide` adds the head, address, DNS and certificate.
pub fn node_table(items: &[Value], wide: bool, now: Timestamp) -> String {
    let mut header = vec![
        "NAME",
        "ONLINE",
        "EDGENODES",
        "PODS",
        "LAST SEEN",
        "VERSION",
    ];
    if wide {
        header.extend(["HEAD", "ADDRESS", "DNS", "CERTIFICATE EXPIRES"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for item in items {
        let text = |v: &Value| v.as_str().unwrap_or("<none>").to_string();
        let number = |v: &Value| v.as_u64().unwrap_or(0);
        let mut row = vec![
            text(&item["name"]),
            item["online"].as_bool().unwrap_or(false).to_string(),
            number(&item["edgenodes"]).to_string(),
            format!("{}/{}", number(&item["podsReady"]), number(&item["pods"])),
            match item["online"].as_bool() {
                Some(true) => "now".into(),
                _ => item["lastSeen"]
                    .as_str()
                    .map_or("<unknown>".into(), |t| format!("{} ago", age(Some(t), now))),
            },
            text(&item["version"]),
        ];
        if wide {
            row.extend([
                text(&item["head"]),
                text(&item["address"]),
                text(&item["dns"]),
                text(&item["certificateExpires"]),
            ]);
        }
        rows.push(row);
    }
    table(rows)
}

/// The template of `-o jsonpath=…`, read before anything is asked.
fn template(output: &GetOutput) -> Result<Option<select::Template>, CommandError> {
    match output {
        GetOutput::JsonPath(text) => select::Template::parse(text)
            .map(Some)
            .map_err(CommandError::Usage),
        _ => Ok(None),
    }
}

/// `edgesync get edgenodes [NAME]`, or `edgesync get nodes`.
pub async fn get(args: &GetArgs) -> Result<(), CommandError> {
    if matches!(args.resource.as_str(), "nodes" | "node" | "no") {
        return node_list(&args.socket, &args.output).await;
    }
    check_resource(&args.resource)?;
    let template = template(&args.output)?;
    let selector = match &args.selector {
        Some(text) => Some(
            select::Selector::parse(text)
                .map_err(|e| CommandError::Usage(format!("-l {text:?}: {e}")))?,
        ),
        None => None,
    };
    let mut value = match &args.name {
        Some(name) => {
            let uri = format!("/v1/edgenodes/{}/{name}", args.namespace);
            match call(&args.socket, Method::GET, &uri, None).await {
                Err(CommandError::NotFound(_)) => {
                    return Err(CommandError::NotFound(format!(
                        "edgenodes.edgesync.io {name:?} not found in namespace {:?}",
                        args.namespace
                    )));
                }
                other => other?,
            }
        }
        None if args.all_namespaces => {
            call(&args.socket, Method::GET, "/v1/edgenodes", None).await?
        }
        None => {
            let uri = format!("/v1/edgenodes?namespace={}", args.namespace);
            call(&args.socket, Method::GET, &uri, None).await?
        }
    };
    if let (Some(selector), Some(items)) = (&selector, value["items"].as_array_mut()) {
        items.retain(|item| selector.matches(&item["metadata"]["labels"]));
    }
    let items = || match &args.name {
        Some(_) => vec![value.clone()],
        None => value["items"].as_array().cloned().unwrap_or_default(),
    };
    match &args.output {
        GetOutput::Json => print_json(&value),
        GetOutput::Yaml => print_yaml(&value)?,
        GetOutput::JsonPath(_) => {
            let template = template.as_ref().expect("read above");
            println!("{}", template.render(&value));
        }
        GetOutput::Name => {
            for item in items() {
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                println!("edgenode.edgesync.io/{name}");
            }
        }
        GetOutput::Table | GetOutput::Wide => {
            let items = items();
            if items.is_empty() && args.all_namespaces {
                eprintln!("No resources found");
            } else if items.is_empty() {
                eprintln!("No resources found in {} namespace.", args.namespace);
            } else {
                print!(
                    "{}",
                    edgenode_table(
                        &items,
                        args.all_namespaces,
                        args.output == GetOutput::Wide,
                        Timestamp::now()
                    )
                );
            }
        }
    }
    match args.watch {
        true => watch(args, selector.as_ref(), template.as_ref()).await,
        false => Ok(()),
    }
}

/// `get -w`: each change after the list, in the list's format, until interrupted.
async fn watch(
    args: &GetArgs,
    selector: Option<&select::Selector>,
    template: Option<&select::Template>,
) -> Result<(), CommandError> {
    use std::io::Write;
    let uri = match args.all_namespaces {
        true => "/v1/edgenodes?watch=true".to_string(),
        false => format!("/v1/edgenodes?watch=true&namespace={}", args.namespace),
    };
    let client = Client::new(&resolve_socket(&args.socket));
    let show = |line: &str| {
        let Ok(mut event) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let mut object = event["object"].take();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let deleted = event["type"] == "DELETED";
        let picked = args.name.as_ref().is_none_or(|n| *n == name)
            && (deleted || selector.is_none_or(|s| s.matches(&object["metadata"]["labels"])));
        if !picked {
            return;
        }
        if deleted {
            object["status"] = serde_json::json!({"phase": "Deleted"});
        }
        match &args.output {
            GetOutput::Json => print_json(&object),
            GetOutput::Yaml => {
                let _ = print_yaml(&object).map(|()| println!("---"));
            }
            GetOutput::Name => println!("edgenode.edgesync.io/{name}"),
            GetOutput::JsonPath(_) => {
                println!(
                    "{}",
                    template.map(|t| t.render(&object)).unwrap_or_default()
                )
            }
            GetOutput::Table | GetOutput::Wide => {
                let wide = args.output == GetOutput::Wide;
                let rows = edgenode_table(&[object], args.all_namespaces, wide, Timestamp::now());
                print!(
                    "{}",
                    rows.lines()
                        .skip(1)
                        .map(|l| format!("{l}\n"))
                        .collect::<String>()
                );
            }
        }
        let _ = std::io::stdout().flush();
    };
    let (status, body) = client.lines(&uri, show).await?;
    match status.is_success() {
        true => Ok(()),
        false => Err(CommandError::Runtime(error_text(status, &body))),
    }
}

/// `edgesync describe edgenode NAME` (or `describe node NAME`).
pub async fn describe(args: &DescribeArgs) -> Result<(), CommandError> {
    if matches!(args.resource.as_str(), "nodes" | "node" | "no") {
        return node_describe(&args.socket, &args.name).await;
    }
    check_resource(&args.resource)?;
    let uri = format!("/v1/edgenodes/{}/{}", args.namespace, args.name);
    let object = match call(&args.socket, Method::GET, &uri, None).await {
        Err(CommandError::NotFound(_)) => {
            return Err(CommandError::NotFound(format!(
                "edgenodes.edgesync.io {:?} not found in namespace {:?}",
                args.name, args.namespace
            )));
        }
        other => other?,
    };
    let now = Timestamp::now();
    let query = format!("/v1/events?namespace={}&name={}", args.namespace, args.name);
    let events = call(&args.socket, Method::GET, &query, None).await?;
    print!(
        "{}{}",
        describe_edgenode(&object, now),
        events_text(&events, false, now)
    );
    Ok(())
}

/// The `Events:` part of `describe`: the latest events, oldest first, as kubectl lists them;
/// `objects` adds which object each is about.
pub fn events_text(events: &Value, objects: bool, now: Timestamp) -> String {
    let lines = events.as_array().cloned().unwrap_or_default();
    if lines.is_empty() {
        return "Events:       <none>\n".into();
    }
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut header = vec!["TYPE", "REASON", "AGE"];
    header.extend(objects.then_some("OBJECT"));
    header.push("MESSAGE");
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for e in &lines {
        let mut age = age(e["time"].as_str(), now);
        if let Some(n) = e["count"].as_u64().filter(|n| *n > 1) {
            age = format!("{age} (x{n})");
        }
        let mut row = vec![text(&e["type"]), text(&e["reason"]), age];
        row.extend(objects.then(|| text(&e["object"])));
        row.push(text(&e["message"]));
        rows.push(row);
    }
    format!("Events:\n{}", indent(&table(rows)))
}

/// The text of `describe edgenode`.
pub fn describe_edgenode(object: &Value, now: Timestamp) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("<none>").to_string();
    let (meta, status) = (&object["metadata"], &object["status"]);
    let labels = meta["labels"]
        .as_object()
        .map_or("<none>".into(), |labels| {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            pairs.join(", ")
        });
    let number = |v: &Value| v.as_i64().map_or("<none>".into(), |n| n.to_string());
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<13}{value}\n"));
    field("Name:", text(&meta["name"]));
    field("Namespace:", text(&meta["namespace"]));
    field("Labels:", labels);
    field(
        "Created:",
        format!(
            "{} ({} ago)",
            text(&meta["creationTimestamp"]),
            age(meta["creationTimestamp"].as_str(), now)
        ),
    );
    field(
        "Generation:",
        format!(
            "{} (the edge applied {})",
            number(&meta["generation"]),
            number(&status["observedGeneration"])
        ),
    );
    field("Phase:", text(&status["phase"]));
    field(
        "Online:",
        format!(
            "{} (last synced {})",
            status["online"].as_bool().unwrap_or(false),
            status["lastSyncedAt"]
                .as_str()
                .map_or("never".into(), |t| format!("{} ago", age(Some(t), now)))
        ),
    );
    out.push_str("Pods:\n");
    let states = status["pods"].as_array().cloned().unwrap_or_default();
    let mut rows = vec![
        ["NAME", "IMAGES", "STATE", "PHASE", "REASON"]
            .map(String::from)
            .to_vec(),
    ];
    for pod in object["spec"]["pods"].as_array().into_iter().flatten() {
        let name = text(&pod["metadata"]["name"]);
        let images: Vec<String> = pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| text(&c["image"]))
            .collect();
        let state = states.iter().find(|s| s["name"] == name.as_str());
        let of = |field: &str| state.map_or("<none>".into(), |s| text(&s[field]));
        rows.push(vec![
            name.clone(),
            images.join(","),
            of("state"),
            of("phase"),
            of("reason"),
        ]);
    }
    out.push_str(&indent(&table(rows)));
    out.push_str("Conditions:\n");
    let mut rows = vec![
        ["TYPE", "STATUS", "SINCE", "REASON", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for c in status["conditions"].as_array().into_iter().flatten() {
        let since = c["lastTransitionTime"]
            .as_str()
            .map_or("<unknown>".into(), |t| format!("{} ago", age(Some(t), now)));
        rows.push(vec![
            text(&c["type"]),
            text(&c["status"]),
            since,
            text(&c["reason"]),
            text(&c["message"]),
        ]);
    }
    out.push_str(&indent(&table(rows)));
    out
}

/// `edgesync node describe NAME`: one registered edge, and its EdgeNodes.
pub async fn node_describe(socket: &Path, name: &str) -> Result<(), CommandError> {
    let list = call(socket, Method::GET, "/v1/nodes", None).await?;
    let Some(edge) = list
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name))
        .cloned()
    else {
        return Err(CommandError::NotFound(format!(
            "no registered edge {}",
            crate::input::show(name)
        )));
    };
    let text = |v: &Value| v.as_str().unwrap_or("<none>").to_string();
    let now = Timestamp::now();
    let mut out = String::new();
    let mut field = |label: &str, value: String| out.push_str(&format!("{label:<22}{value}\n"));
    field("Name:", text(&edge["name"]));
    field(
        "Online:",
        edge["online"].as_bool().unwrap_or(false).to_string(),
    );
    field("Head:", text(&edge["head"]));
    field("Address:", text(&edge["address"]));
    field("DNS:", text(&edge["dns"]));
    field(
        "Last seen:",
        match edge["online"].as_bool() {
            Some(true) => "now".into(),
            _ => edge["lastSeen"].as_str().map_or("<unknown>".into(), |t| {
                format!("{t} ({} ago)", age(Some(t), now))
            }),
        },
    );
    field("Certificate expires:", text(&edge["certificateExpires"]));
    field("Version:", text(&edge["version"]));
    field(
        "Pods:",
        format!(
            "{}/{} ready",
            edge["podsReady"].as_u64().unwrap_or(0),
            edge["pods"].as_u64().unwrap_or(0)
        ),
    );
    let all = call(socket, Method::GET, "/v1/edgenodes", None).await?;
    let items: Vec<Value> = all["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item["metadata"]["name"] == name)
        .cloned()
        .collect();
    out.push_str("EdgeNodes:\n");
    match items.is_empty() {
        true => out.push_str("  <none>\n"),
        false => out.push_str(&indent(&edgenode_table(&items, true, false, now))),
    }
    let events = call(
        socket,
        Method::GET,
        &format!("/v1/events?edge={name}"),
        None,
    )
    .await?;
    out.push_str(&events_text(&events, true, now));
    print!("{out}");
    Ok(())
}

/// `text` with every line indented by two spaces.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `edgesync delete edgenode NAME`.
pub async fn delete(args: &DeleteArgs) -> Result<(), CommandError> {
    let names = match (&args.file, &args.resource, &args.name) {
        (Some(file), _, _) => {
            let text = read_text(file, crate::input::MAX_INPUT_BYTES, "one delete takes")?;
            crate::input::edgenode_names(&text, &args.namespace)
                .map_err(|e| CommandError::Usage(format!("{}: {e}", file.display())))?
        }
        (None, Some(resource), Some(name)) => {
            check_resource(resource)?;
            vec![(args.namespace.clone(), name.clone())]
        }
        _ => {
            return Err(CommandError::Usage(
                "name an EdgeNode or give -f FILE".into(),
            ));
        }
    };
    // Like kubectl: each is deleted or said missing; a missing one fails the command at the end.
    let mut missing = None;
    for (namespace, name) in names {
        let uri = format!("/v1/edgenodes/{namespace}/{name}");
        match call(&args.socket, Method::DELETE, &uri, None).await {
            Ok(_) => println!("edgenode.edgesync.io {name:?} deleted"),
            Err(CommandError::NotFound(_)) => {
                let said =
                    format!("edgenodes.edgesync.io {name:?} not found in namespace {namespace:?}");
                if missing.is_some() {
                    eprintln!("error: {said}");
                }
                missing = missing.or(Some(said));
            }
            Err(e) => return Err(e),
        }
    }
    match missing {
        Some(said) => Err(CommandError::NotFound(said)),
        None => Ok(()),
    }
}

/// `edgesync diff -f FILE`: what `apply` would change, as a unified diff of each EdgeNode's
/// labels and spec; exits 1 when something would change, as kubectl does.
pub async fn diff(args: &DiffArgs) -> Result<(), CommandError> {
    let name = args.file.display().to_string();
    let text = read_text(&args.file, crate::input::MAX_INPUT_BYTES, "one apply takes")?;
    let uri = format!("/v1/diff?namespace={}", args.namespace);
    let diffs = match call(&args.socket, Method::POST, &uri, Some(text.into_bytes())).await {
        Err(CommandError::Usage(message)) => {
            return Err(CommandError::Usage(format!("{name}: {message}")));
        }
        other => other?,
    };
    let mut changes = false;
    for diff in diffs.as_array().into_iter().flatten() {
        if let Some(text) = diff["diff"].as_str().filter(|t| !t.is_empty()) {
            print!("{text}");
            changes = true;
        }
    }
    match changes {
        true => Err(CommandError::Exit(1)),
        false => Ok(()),
    }
}

/// `edgesync status`.
pub async fn status(args: &StatusArgs) -> Result<(), CommandError> {
    let value = call(&args.socket, Method::GET, "/v1/status", None).await?;
    match args.output {
        StatusOutput::Json => print_json(&value),
        StatusOutput::Table => {
            let report: StatusReport =
                serde_json::from_value(value).map_err(|e| CommandError::Runtime(e.to_string()))?;
            print!("{}", status_text(&report, Timestamp::now()));
        }
    }
    Ok(())
}

/// `edgesync token create`.
pub async fn token(action: crate::cli::TokenAction) -> Result<(), CommandError> {
    use crate::cli::TokenAction;
    match action {
        TokenAction::Create {
            ttl,
            print_join_command,
            head,
            socket,
        } => {
            let ttl = crate::config::parse_duration("--ttl", &ttl)
                .map_err(|e| CommandError::Usage(e.to_string()))?;
            let body = serde_json::json!({"ttlSeconds": ttl.as_secs()})
                .to_string()
                .into_bytes();
            let value = call(&socket, Method::POST, "/v1/tokens", Some(body)).await?;
            let token = value["token"].as_str().unwrap_or_default();
            match print_join_command {
                false => println!("{token}"),
                true => {
                    let head =
                        head.unwrap_or_else(|| value["head"].as_str().unwrap_or_default().into());
                    println!(
                        "edgesync edge --node-name \"$(hostname)\" --head {head} --token {token}"
                    );
                }
            }
        }
        TokenAction::List { output, socket } => {
            let tokens = call(&socket, Method::GET, "/v1/tokens", None).await?;
            match output.as_str() {
                "json" => print_json(&tokens),
                _ => {
                    let now = crate::clock::unix_now();
                    let mut rows = vec![vec!["ID".to_string(), "EXPIRES".into(), "AGE".into()]];
                    for t in tokens.as_array().into_iter().flatten() {
                        let expires = t["expiresAt"].as_i64().unwrap_or(0);
                        let created = t["createdAt"].as_i64().unwrap_or(0);
                        let expires = match expires <= now {
                            true => "expired".to_string(),
                            false => format!("in {}", span(expires - now)),
                        };
                        let made = if created > 0 {
                            span(now - created)
                        } else {
                            "-".into()
                        };
                        rows.push(vec![t["id"].as_str().unwrap_or("-").into(), expires, made]);
                    }
                    print!("{}", table(rows));
                }
            }
        }
        TokenAction::Delete { id, socket } => {
            if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(CommandError::Usage(format!(
                    "token id {}: letters and digits only, as `edgesync token list` shows",
                    crate::input::show(&id)
                )));
            }
            let uri = format!("/v1/tokens/{id}?actor={}", actor());
            call(&socket, Method::DELETE, &uri, None).await?;
            println!("join token {id:?} deleted");
        }
    }
    Ok(())
}

/// `edgesync node remove NAME`.
pub async fn node_remove(socket: &Path, name: &str) -> Result<(), CommandError> {
    crate::input::check_subdomain(name)
        .map_err(|r| CommandError::Usage(format!("node name: {r}")))?;
    let uri = format!("/v1/nodes/{name}?actor={}", actor());
    call(socket, Method::DELETE, &uri, None).await?;
    println!("node {name:?} removed");
    Ok(())
}

/// Who runs the CLI, for the audit log.
fn actor() -> String {
    let name = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", rustix::process::getuid().as_raw()));
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect()
}

/// `edgesync user list|approve|reject|revoke`.
pub async fn user(action: crate::cli::UserAction) -> Result<(), CommandError> {
    use crate::cli::UserAction;
    let (name, socket, verb) = match action {
        UserAction::List { socket, output } => {
            let users = call(&socket, Method::GET, "/v1/users", None).await?;
            return print_users(&users, &output);
        }
        UserAction::Approve(u) => (u.name, u.socket, "approve"),
        UserAction::Reject(u) => (u.name, u.socket, "reject"),
        UserAction::Revoke(u) => (u.name, u.socket, "revoke"),
    };
    crate::input::check_label(&name).map_err(|r| CommandError::Usage(format!("username: {r}")))?;
    let uri = format!("/v1/users/{name}/{verb}?actor={}", actor());
    let user = call(&socket, Method::POST, &uri, None).await?;
    let status = user["status"].as_str().unwrap_or_default();
    match user["changed"].as_bool() {
        Some(false) => println!("user {name:?} is already {status}; nothing changed"),
        _ => println!("user {name:?} is now {status}"),
    }
    Ok(())
}

fn print_users(users: &Value, output: &str) -> Result<(), CommandError> {
    match output {
        "json" => print_json(users),
        "table" => {
            let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
            let mut rows = vec![
                ["USERNAME", "EMAIL", "STATUS", "AUP", "AUP EXPIRES"]
                    .map(String::from)
                    .to_vec(),
            ];
            for u in users.as_array().into_iter().flatten() {
                let aup = match (u["aup"]["valid"].as_bool(), u["aup"]["version"].as_i64()) {
                    (Some(true), Some(v)) => format!("v{v}"),
                    (_, Some(v)) => format!("v{v} (not valid)"),
                    _ => "-".into(),
                };
                rows.push(vec![
                    text(&u["username"]),
                    text(&u["email"]),
                    text(&u["status"]),
                    aup,
                    text(&u["aup"]["expiresAt"]),
                ]);
            }
            print!("{}", table(rows));
        }
        other => {
            return Err(CommandError::Usage(format!(
                "-o {other}: use table or json"
            )));
        }
    }
    Ok(())
}

/// `edgesync aup set -f FILE`.
pub async fn aup_set(socket: &Path, file: &str) -> Result<(), CommandError> {
    let text = read_text(
        Path::new(file),
        crate::control::MAX_BODY,
        "a policy may have",
    )?;
    let uri = format!("/v1/aup?actor={}", actor());
    let aup = call(socket, Method::PUT, &uri, Some(text.into_bytes())).await?;
    println!(
        "Acceptable Use Policy version {} published; users must accept it again",
        aup["version"]
    );
    Ok(())
}

/// `5s`, `3m`, `2h`, `4d`, as kubectl prints ages; `<unknown>` without a time.
pub fn age(since: Option<&str>, now: Timestamp) -> String {
    let Some(then) = since.and_then(|s| s.parse::<Timestamp>().ok()) else {
        return "<unknown>".into();
    };
    span(now.as_second().saturating_sub(then.as_second()))
}

/// A number of seconds as kubectl prints ages: `5s`, `3m`, `2h`, `4d`.
fn span(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// The `get` table: NAME, PHASE, PODS, ONLINE, LAST SYNC, AGE (and NAMESPACE first with -A).
pub fn edgenode_table(items: &[Value], with_namespace: bool, wide: bool, now: Timestamp) -> String {
    let mut header = vec!["NAME", "PHASE", "PODS", "ONLINE", "LAST SYNC", "AGE"];
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    if wide {
        header.extend(["GENERATION", "OBSERVED", "LABELS"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for item in items {
        let text = |v: &Value| v.as_str().unwrap_or("").to_string();
        let status = &item["status"];
        let mut row = vec![
            text(&item["metadata"]["name"]),
            text(&status["phase"]),
            text(&status["podsReady"]),
            status["online"]
                .as_bool()
                .map(|b| b.to_string())
                .unwrap_or_default(),
            status["lastSyncedAt"]
                .as_str()
                .map_or("never".into(), |t| age(Some(t), now)),
            age(item["metadata"]["creationTimestamp"].as_str(), now),
        ];
        if with_namespace {
            row.insert(0, text(&item["metadata"]["namespace"]));
        }
        if wide {
            let number = |v: &Value| v.as_i64().map_or("<none>".into(), |n| n.to_string());
            let labels = item["metadata"]["labels"].as_object().map(|labels| {
                let pairs: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                pairs.join(",")
            });
            row.extend([
                number(&item["metadata"]["generation"]),
                number(&status["observedGeneration"]),
                labels
                    .filter(|l| !l.is_empty())
                    .unwrap_or_else(|| "<none>".into()),
            ]);
        }
        rows.push(row);
    }
    table(rows)
}

/// The human `status` output.
pub fn status_text(report: &StatusReport, now: Timestamp) -> String {
    let mut out = format!("Node:   {} ({})\n\nPeers:\n", report.node, report.role);
    if report.peers.is_empty() {
        out.push_str("  (none yet)\n");
    } else {
        let mut rows = vec![
            [
                "NAME",
                "ROLE",
                "ADDRESS",
                "STATE",
                "LAST SEEN",
                "BYTES IN",
                "BYTES OUT",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for p in &report.peers {
            rows.push(vec![
                p.name.clone(),
                p.role.to_string(),
                p.address.clone(),
                if p.connected {
                    "connected"
                } else {
                    "disconnected"
                }
                .into(),
                age(p.last_seen.as_deref(), now),
                p.bytes_in.to_string(),
                p.bytes_out.to_string(),
            ]);
        }
        out.push_str(&indent(&table(rows)));
    }
    out.push_str("\nDocuments:\n");
    if report.documents.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut rows = vec![
            ["EDGENODE", "GENERATION", "PODS", "LAST SYNC"]
                .map(String::from)
                .to_vec(),
        ];
        for d in &report.documents {
            let key = if d.deleted {
                format!("{} (deleted)", d.key)
            } else {
                d.key.clone()
            };
            let synced = d
                .last_synced_at
                .as_deref()
                .map_or("never".into(), |t| age(Some(t), now));
            rows.push(vec![
                key,
                d.generation.to_string(),
                d.pods.to_string(),
                synced,
            ]);
        }
        out.push_str(&indent(&table(rows)));
    }
    if report.role == crate::transport::tls::Role::Edge {
        out.push_str("\nApplied pods:\n");
        if report.applied_pods.is_empty() {
            out.push_str("  (none)\n");
        } else {
            let mut rows = vec![
                ["EDGENODE", "POD", "STATE", "FILE", "REASON"]
                    .map(String::from)
                    .to_vec(),
            ];
            for p in &report.applied_pods {
                rows.push(vec![
                    p.edgenode.clone(),
                    p.pod.clone(),
                    p.state.clone(),
                    p.file.clone().unwrap_or_else(|| "-".into()),
                    p.reason.clone().unwrap_or_default(),
                ]);
            }
            out.push_str(&indent(&table(rows)));
        }
    }
    out
}

/// `edgesync audit [--since DURATION]`.
pub async fn audit(
    socket: &Path,
    since: Option<&str>,
    output: StatusOutput,
) -> Result<(), CommandError> {
    let since = match since {
        Some(text) => {
            let back = crate::config::parse_duration("--since", text)
                .map_err(|e| CommandError::Usage(e.to_string()))?;
            crate::clock::unix_now()
                .saturating_sub(i64::try_from(back.as_secs()).unwrap_or(i64::MAX))
        }
        None => 0,
    };
    let rows = call(
        socket,
        Method::GET,
        &format!("/v1/audit?since={since}"),
        None,
    )
    .await?;
    if output == StatusOutput::Json {
        print_json(&rows);
        return Ok(());
    }
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut lines = vec![
        ["TIME", "ACTOR", "ACTION", "SUBJECT", "DETAIL"]
            .map(String::from)
            .to_vec(),
    ];
    for row in rows.as_array().into_iter().flatten() {
        lines.push(
            ["at", "actor", "action", "subject", "detail"]
                .map(|f| text(&row[f]))
                .to_vec(),
        );
    }
    match lines.len() {
        1 => eprintln!("No audit entries"),
        _ => print!("{}", table(lines)),
    }
    Ok(())
}

/// `edgesync version`.
pub fn version(args: &VersionArgs) -> Result<(), CommandError> {
    let info = crate::version::build_info();
    match args.output {
        VersionOutput::Json => print_json(&info),
        VersionOutput::Yaml => print_yaml(&info)?,
        VersionOutput::Text => {
            println!("edgesync {}", info.version);
            println!("commit:     {}", info.commit);
            println!("build date: {}", info.build_date);
            println!(
                "wire:       version {} (ALPN {})",
                info.wire_version, info.alpn
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let now: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        assert_eq!(age(Some("2026-01-01T23:59:30Z"), now), "30s");
        assert_eq!(age(Some("2026-01-01T23:00:00Z"), now), "60m");
        assert_eq!(age(Some("2025-12-30T00:00:00Z"), now), "3d");
        assert_eq!(age(None, now), "<unknown>");
    }

    #[test]
    fn table_aligns_columns() {
        let item = serde_json::json!({"metadata": {"name": "edge01", "namespace": "default", "creationTimestamp": "2026-01-01T23:59:00Z"},
            "status": {"phase": "Running", "podsReady": "1/1", "online": true, "lastSyncedAt": "2026-01-01T23:59:58Z"}});
        let now: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let text = edgenode_table(&[item], false, false, now);
        assert_eq!(
            text,
            "NAME     PHASE     PODS   ONLINE   LAST SYNC   AGE\nedge01   Running   1/1    true     2s          60s\n"
        );
    }
}
