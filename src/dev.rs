//! `edgesync dev`: a head and an edge in one process on loopback with temporary state; applies
//! the example EdgeNode and shows the manifests as they appear and change.

use crate::commands::CommandError;
use crate::config::{EdgeConfig, HeadConfig};
use crate::edge::Edge;
use crate::head::Head;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The example EdgeNode shipped in `example/edge01.yaml`.
pub const EXAMPLE: &str = include_str!("../example/edge01.yaml");

fn runtime(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

/// Runs the demo; with `once`, exits after the scripted steps instead of waiting for Ctrl-C.
pub async fn run(once: bool) -> Result<(), CommandError> {
    let tmp = tempfile::Builder::new()
        .prefix("edgesync-dev-")
        .tempdir()
        .map_err(runtime)?;
    let head = Head::start(HeadConfig::for_test(&tmp.path().join("head")))
        .await
        .map_err(runtime)?;
    let token_file = tmp.path().join("head/state/join-token");
    let token = std::fs::read_to_string(&token_file)
        .map_err(runtime)?
        .trim()
        .to_string();
    let edge_config = EdgeConfig::for_test(
        &tmp.path().join("edge"),
        "edge01",
        head.local_addr(),
        Some(token),
    );
    let manifests = edge_config.manifest_dir.clone();
    let edge = Edge::start(edge_config).await.map_err(runtime)?;
    let head_socket = tmp.path().join("head/head.sock");
    let edge_socket = tmp.path().join("edge/edge.sock");
    println!(
        "edgesync dev: a head and an edge (edge01) on loopback, state in {}",
        tmp.path().display()
    );
    println!(
        "  head  QUIC {}  socket {}",
        head.local_addr(),
        head_socket.display()
    );
    println!(
        "  edge  manifests {}  socket {}",
        manifests.display(),
        edge_socket.display()
    );
    println!();

    let mut seen = BTreeMap::new();
    println!("$ edgesync apply -f example/edge01.yaml   (on the head)");
    step(&head, EXAMPLE, &manifests, &mut seen).await?;
    println!("$ edgesync apply   (on the head: image nginx -> nginx:1.27)");
    step(
        &head,
        &EXAMPLE.replace("image: nginx", "image: nginx:1.27"),
        &manifests,
        &mut seen,
    )
    .await?;

    if once {
        edge.shutdown().await;
        head.shutdown().await;
        return Ok(());
    }
    println!("Try it yourself in another terminal, then watch this one:");
    println!("  edgesync --help");
    println!(
        "  edgesync get edgenodes --socket {}",
        head_socket.display()
    );
    println!(
        "  edgesync apply -f example/edge01.yaml --socket {}",
        edge_socket.display()
    );
    println!("  edgesync status --socket {}", edge_socket.display());
    println!("Ctrl-C stops both nodes and removes the temporary state.");
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let terminated = crate::runtime::terminated();
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            _ = &mut terminated => break,
            _ = tick.tick() => {
                show_changes(&manifests, &mut seen);
            }
        }
    }
    edge.shutdown().await;
    head.shutdown().await;
    Ok(())
}

async fn step(
    head: &Head,
    text: &str,
    dir: &Path,
    seen: &mut BTreeMap<String, String>,
) -> Result<(), CommandError> {
    let started = Instant::now();
    for outcome in head
        .node()
        .docs()
        .apply_text(text, "default")
        .await
        .map_err(runtime)?
    {
        let name = outcome.key.rsplit('/').next().unwrap_or_default();
        println!("edgenode.edgesync.io/{name} {}", outcome.result);
    }
    let deadline = started + Duration::from_secs(10);
    loop {
        if show_changes(dir, seen) {
            println!(
                "  (on the edge {} ms after apply)\n",
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CommandError::Runtime(
                "the edge did not write the manifest within 10s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Prints manifests that appeared, changed or vanished since `seen`; returns whether any did.
fn show_changes(dir: &Path, seen: &mut BTreeMap<String, String>) -> bool {
    let mut now = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".json")
                && let Ok(content) = std::fs::read_to_string(entry.path())
            {
                now.insert(name, content);
            }
        }
    }
    let mut changed = false;
    for (name, content) in &now {
        let verb = match seen.get(name) {
            None => "new",
            Some(old) if old != content => "changed",
            Some(_) => continue,
        };
        changed = true;
        println!("--- {verb}: {}/{name}", dir.display());
        println!("{}", content.trim_end());
    }
    for name in seen.keys().filter(|n| !now.contains_key(*n)) {
        changed = true;
        println!("--- removed: {}/{name}", dir.display());
    }
    *seen = now;
    changed
}
