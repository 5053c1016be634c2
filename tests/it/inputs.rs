//! Hostile and oversized inputs against real processes: `apply` through the CLI on head and
//! edge, EdgeNodes through the Kubernetes bridge, and bodies on the head's HTTPS API. Each is
//! refused with one short line (or a 413 the client reads), and the head's memory stays put.

use crate::harness::*;
use crate::kube::Cluster;
use edgesync::crd::EdgeNode;
use edgesync::input::{self, MAX_INPUT_BYTES, MAX_NODES, MAX_PODS};
use kube::api::{Api, PostParams};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;

/// An EdgeNode for edge01 with one pod named `pod`.
fn with_pod(namespace: &str, pod: &str) -> String {
    edgenode(namespace, "edge01", &[(pod, "nginx")])
}

/// A valid DNS-1123 pod name of `len` characters (labels of at most 63).
fn long_name(len: usize) -> String {
    let mut name: String = (0..len)
        .map(|i| if i % 64 == 63 { '.' } else { 'a' })
        .collect();
    name.replace_range(len - 1.., "z");
    name
}

/// `edgesync apply -f -` with `text` on standard input, which the CLI may stop reading early.
fn apply_stdin(socket: &str, text: &str) -> std::process::Output {
    let mut child = std::process::Command::new(bin())
        .args(["apply", "-f", "-", "--socket", socket])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text = text.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Asserts a refused apply: exit code 2 and one short line naming `expected`.
fn assert_refused(out: std::process::Output, expected: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{}", &err[..err.len().min(500)]);
    assert!(err.len() < 400, "a short message: {} bytes", err.len());
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    for part in expected {
        assert!(err.contains(part), "{err:?} lacks {part:?}");
    }
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unwritable_edgenodes_are_refused_on_head_and_edge() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;

        // Larger than one apply takes: refused before anything is sent, every time.
        let big = format!("{}#{}\n", example("nginx"), "x".repeat(6 << 20));
        let file = write(dir.path(), "big.yaml", &big);
        for _ in 0..5 {
            assert_refused(
                head.daemon.cli(&["apply", "-f", &file]),
                &[&file, &MAX_INPUT_BYTES.to_string()],
            );
        }
        let socket = head.daemon.socket.to_str().unwrap();
        let out = apply_stdin(socket, &big);
        assert_refused(out, &[&format!("-: more than the {MAX_INPUT_BYTES} bytes")]);

        // Long pod names are not echoed back whole.
        for len in [300 << 10, MAX_INPUT_BYTES] {
            let huge = write(
                dir.path(),
                "huge.yaml",
                &with_pod("default", &"a".repeat(len)),
            );
            let out = head.daemon.cli(&["apply", "-f", &huge]);
            assert_refused(out, &[&huge]);
        }

        // Too many pods for one EdgeNode.
        let pods: Vec<(String, &str)> =
            (0..=MAX_PODS).map(|i| (format!("p{i}"), "nginx")).collect();
        let refs: Vec<(&str, &str)> = pods.iter().map(|(n, i)| (n.as_str(), *i)).collect();
        let many = write(
            dir.path(),
            "many.yaml",
            &edgenode("default", "edge01", &refs),
        );
        for daemon in [&head.daemon, &edge] {
            assert_refused(
                daemon.cli(&["apply", "-f", &many]),
                &["spec.pods: 111 pods, more than the 110"],
            );
        }

        // A valid pod name whose manifest file name would not fit in 255 bytes, on the head
        // and on the edge's own socket (also while it is offline).
        let name = long_name(240);
        let file = write(dir.path(), "long.yaml", &with_pod("default", &name));
        for daemon in [&head.daemon, &edge] {
            assert_refused(
                daemon.cli(&["apply", "-f", &file]),
                &[&file, "spec.pods[0].metadata.name: too long", "at most 233"],
            );
        }
        // The longest that fits is applied and written on the edge.
        let fits = long_name(233);
        ok(head.daemon.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "fits.yaml", &with_pod("default", &fits)),
        ]));
        wait_for("the longest pod name's manifest", SOON, || {
            dirs.manifest("default", &fits)
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_bridge_refuses_pods_whose_manifest_cannot_exist() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &["--kubeconfig", &cluster.kubeconfig],
        )
        .await;
        let object: Value = serde_saphyr::from_str(&with_pod("default", &long_name(240))).unwrap();
        let api: Api<EdgeNode> = Api::namespaced(cluster.client.clone(), "default");
        api.create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
        let valid = wait_for("Valid=False on the resource", SOON, || {
            let object = cluster.object("default", "edge01")?;
            let conditions = object["status"]["conditions"].as_array()?.clone();
            conditions
                .into_iter()
                .find(|c| c["type"] == "Valid" && c["status"] == "False")
        })
        .await;
        assert!(
            valid["message"]
                .as_str()
                .unwrap()
                .contains("spec.pods[0].metadata.name: too long"),
            "{valid}"
        );
        let out = head
            .daemon
            .cli(&["get", "edgenodes", "edge01", "-o", "json"]);
        let pods = serde_json::from_slice::<Value>(&out.stdout)
            .map(|n| pod_names(&n))
            .unwrap_or_default();
        assert!(pods.is_empty(), "nothing of it in the document: {pods:?}");
    })
    .await;
}

/// A TLS connection to the head's API that trusts only its CA (blocking).
fn tls_stream(
    head: &HeadProc,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let pem = std::fs::read(head.state.join("ca.crt")).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let tls = edgesync::transport::tls::https_client_config(&der).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(tls), name).unwrap();
    let tcp = std::net::TcpStream::connect(head.api).unwrap();
    tcp.set_read_timeout(Some(SOON)).unwrap();
    tcp.set_write_timeout(Some(SOON)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Sends a registration of `len` bytes the way the least patient clients do (the whole body
/// first, then read), with a Content-Length or chunked, and returns the answer's status line and
/// body.
fn post_all_then_read(head: &HeadProc, len: usize, chunked: bool) -> (String, String) {
    let mut stream = tls_stream(head);
    let framing = match chunked {
        true => "Transfer-Encoding: chunked".to_string(),
        false => format!("Content-Length: {len}"),
    };
    let request = format!(
        "POST /api/v1/registrations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let chunk = vec![b' '; 64 << 10];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        if chunked {
            stream.write_all(format!("{n:x}\r\n").as_bytes()).unwrap();
        }
        stream
            .write_all(&chunk[..n])
            .unwrap_or_else(|e| panic!("sending the body failed after {sent} bytes: {e}"));
        if chunked {
            stream.write_all(b"\r\n").unwrap();
        }
        sent += n;
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").unwrap();
    }
    stream.flush().unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        // Some servers end TLS without close_notify; what was read is still the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("reading the answer failed: {e}"),
    }
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_large_bodies_with_a_413_the_client_reads() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let http = crate::users::client(&head);
        let url = format!("https://localhost:{}/api/v1/registrations", head.api.port());
        let response = http
            .post(&url)
            .header("content-type", "application/json")
            .body(vec![b' '; 4 << 20])
            .send()
            .await
            .expect("the client reads an answer");
        assert_eq!(response.status(), 413);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "request body is larger than 16384 bytes");

        let head = std::sync::Arc::new(head);
        for chunked in [false, true] {
            let h = head.clone();
            let (status, body) =
                tokio::task::spawn_blocking(move || post_all_then_read(&h, 4 << 20, chunked))
                    .await
                    .unwrap();
            assert!(status.starts_with("HTTP/1.1 413"), "chunked {chunked}: {status:?}");
            assert!(body.contains("larger than 16384 bytes"), "chunked {chunked}: {body:?}");
        }
        // A body within the limit still reaches the handler.
        let response = http
            .post(&url)
            .json(&serde_json::json!({"username": "ada", "email": "ada@example.org", "fullName": "Ada"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    })
    .await;
}

/// The resident memory of the process whose command line mentions `dir`, in KiB.
fn rss_kib(dir: &Path) -> u64 {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with(bin()) && cmdline.contains(" head ") && cmdline.contains(&needle) {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no head process for {needle}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_inputs_leave_the_heads_memory_near_its_baseline() {
    within(180, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let http = crate::users::client(&head);
        let url = format!("https://localhost:{}/api/v1/registrations", head.api.port());
        let anchored = format!("b: &b [{}]\n", vec!["x"; 100].join(", "));
        let hostile = [
            alias_bomb(),
            format!("{anchored}c: [{}]\n", vec!["*b"; 1000].join(", ")),
            "[".repeat(100_000),
            "- x\n".repeat(250_000),
            // Within the node budget: parsed, then refused as no EdgeNode.
            "- x\n".repeat(MAX_NODES - 10),
            "{a: 1}\n---\n".repeat(90_000),
            with_pod("default", &"a".repeat(MAX_INPUT_BYTES - 500)),
            format!("{}#{}", example("nginx"), "x".repeat(6 << 20)),
        ];
        let files: Vec<String> = hostile
            .iter()
            .enumerate()
            .map(|(i, text)| write(dir.path(), &format!("hostile{i}.yaml"), text))
            .collect();
        let send_all = || async {
            for file in &files {
                let out = head.daemon.cli(&["apply", "-f", file]);
                assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
            }
            for body in [vec![b' '; 4 << 20], "[".repeat(16 << 10).into_bytes()] {
                let status = http.post(&url).body(body).send().await.unwrap().status();
                assert!(status == 413 || status == 400, "{status}");
            }
        };
        // Warm up with what a user does: a valid apply and an API request.
        ok(head.daemon.cli(&["apply", "-f", &write(dir.path(), "ok.yaml", &example("nginx"))]));
        let _ = http.get(format!("https://localhost:{}/api/v1/aup", head.api.port())).send().await.unwrap();
        let baseline = rss_kib(dir.path());
        send_all().await;
        let first = rss_kib(dir.path());
        for _ in 0..10 {
            send_all().await;
        }
        let after = rss_kib(dir.path());
        eprintln!("head RSS: {baseline} KiB at baseline, {first} KiB after one round of refusals, {after} KiB after eleven");
        // What a hostile text would cost if it were expanded or kept is hundreds of MB (the
        // alias bomb alone 9^9 nodes). Below that, glibc keeps some MB freed in the arena of
        // whichever thread parsed: 4-9 MB over eleven rounds in repeated runs of one build.
        for rss in [first, after] {
            let grown = rss.saturating_sub(baseline);
            assert!(grown < 12 << 10, "resident memory grew by {grown} KiB");
        }
    })
    .await;
}

#[path = "../../fuzz/src/lib.rs"]
mod fuzz_targets;

/// The fuzz targets, as plain functions, over the committed corpus and seeded mutations of it
/// (a bounded loop, no sanitizer): what the fuzzer found interesting stays checked by every
/// `cargo test`. `scripts/fuzz-smoke` runs the same targets under libFuzzer.
#[test]
fn the_fuzz_corpus_and_its_mutations_pass_every_target() {
    type Target = fn(&[u8]);
    let targets: [(&str, Target); 3] = [
        ("wire_frame", fuzz_targets::wire_frame),
        ("edgenode_input", fuzz_targets::edgenode_input),
        ("join_request", fuzz_targets::join_request),
    ];
    for (target, run) in targets {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        let started = std::time::Instant::now();
        let mut rng = fastrand::Rng::with_seed(12);
        for file in &files {
            let input = std::fs::read(file).unwrap();
            run(&input);
            for _ in 0..8 {
                if started.elapsed() > std::time::Duration::from_secs(5) {
                    break;
                }
                run(&mutate(&input, &mut rng));
            }
        }
    }
}

/// `input` with one random edit: a bit flipped, a byte set, a range cut or repeated.
fn mutate(input: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    if out.is_empty() {
        return vec![rng.u8(..)];
    }
    let at = rng.usize(..out.len());
    match rng.u8(..4) {
        0 => out[at] ^= 1 << rng.u8(..8),
        1 => out[at] = rng.u8(..),
        2 => {
            let end = rng.usize(at..=out.len());
            out.drain(at..end);
        }
        _ => {
            let end = rng.usize(at..=out.len().min(at + 64));
            let copy = out[at..end].to_vec();
            out.splice(at..at, copy);
        }
    }
    out
}

/// The README's Limits section states the limits that are enforced.
#[test]
fn the_readme_states_the_input_limits() {
    let readme = include_str!("../../README.md");
    let limits = &readme[readme.find("## Limits").unwrap()..];
    let limits = &limits[..limits[1..]
        .find("\n## ")
        .map_or(limits.len(), |end| end + 1)];
    let numbers = |n: usize| {
        let digits = n.to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        grouped
    };
    for limit in [
        input::MAX_INPUT_BYTES,
        input::MAX_DOCUMENTS,
        input::MAX_NODES,
        input::MAX_DEPTH,
        input::MAX_ANCHORS,
        input::MAX_EDGENODE_BYTES,
        input::MAX_PODS,
        edgesync::head::api::MAX_BODY,
        edgesync::sync::wire::MAX_FRAME,
    ] {
        assert!(
            limits.contains(&numbers(limit)),
            "Limits lacks {}",
            numbers(limit)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let good = write(dir.path(), "good.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &good]));
        wait_for("manifest", SOON, || dirs.manifest("default", "nginx")).await;
        let before = head.daemon.json(&["get", "edgenodes", "edge01", "-o", "json"])["spec"].clone();
        let pod = |extra: &str| format!("{}{extra}", example("nginx:bad"));
        let cases: Vec<(&str, String, &str)> = vec![
            ("malformed", "kind: EdgeNode\nmetadata: [".into(), "not valid YAML"),
            ("unknown", example("nginx:bad").replace("pods:", "podz:"), "spec.podz: unknown field"),
            ("unknown-in-pod", example("nginx:bad").replace("imagePullPolicy", "imagePullPolicyy"), "spec.pods[0].spec.containers[0].imagePullPolicyy: unknown field"),
            ("duplicate", edgenode("default", "edge01", &[("web", "a"), ("web", "b")]), "spec.pods[1].metadata.name: duplicate pod name"),
            ("not-dns", edgenode("default", "edge01", &[("Web_1", "a")]), "spec.pods[0].metadata.name"),
            ("escape", edgenode("default", "edge01", &[("../../etc/cron.d/x", "a")]), "spec.pods[0].metadata.name"),
            ("privileged", pod("            securityContext:\n              privileged: true\n"), "spec.pods[0].spec.containers[0].securityContext.privileged"),
            ("host-network", example("nginx:bad").replace("      spec:\n        containers", "      spec:\n        hostNetwork: true\n        containers"), "spec.pods[0].spec.hostNetwork"),
            ("host-path", example("nginx:bad").replace("      spec:\n        containers", "      spec:\n        volumes: [{name: root, hostPath: {path: /}}]\n        containers"), "spec.pods[0].spec.volumes[0].hostPath"),
            ("capability", pod("            securityContext:\n              capabilities:\n                add: [NET_ADMIN]\n"), "capabilities.add[0]"),
            ("wrong-kind", example("nginx:bad").replace("kind: EdgeNode", "kind: Deployment"), "kind"),
        ];
        for (name, text, expected) in &cases {
            let file = write(dir.path(), &format!("{name}.yaml"), text);
            let out = head.daemon.cli(&["apply", "-f", &file]);
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(2), "{name}: {err}");
            assert!(err.contains(&file) && err.contains(expected), "{name}: {err:?} lacks {expected:?}");
            assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line: {err:?}");
            assert!(out.stdout.is_empty(), "{name}: nothing printed as applied");
        }
        // A file with one good and one bad document changes nothing either.
        let mixed = format!("{}---\n{}", edgenode("default", "edge01", &[("new", "nginx")]), edgenode("default", "x", &[("Bad", "a")]));
        let mixed = write(dir.path(), "mixed.yaml", &mixed);
        assert_eq!(head.daemon.cli(&["apply", "-f", &mixed]).status.code(), Some(2));
        let out = head.daemon.cli(&["apply", "-f", &dir.path().join("missing.yaml").display().to_string()]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));

        assert_eq!(head.daemon.json(&["get", "edgenodes", "edge01", "-o", "json"])["spec"], before);
        assert_eq!(dirs.files(), ["edgesync_default_nginx.json"]);
        assert_eq!(image(&dirs.manifest("default", "nginx").unwrap()), "nginx");
        // The edge validates as well: the same refusals on its own socket.
        let out = edge.cli(&["apply", "-f", &write(dir.path(), "p.yaml", &pod("            securityContext:\n              privileged: true\n"))]);
        assert_eq!(out.status.code(), Some(2));
        // Unknown resource types are usage errors.
        assert_eq!(head.daemon.cli(&["get", "pods"]).status.code(), Some(2));
    })
    .await;
}
