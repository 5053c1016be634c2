//! The user portal in a real browser (Debian's chromium, driven through chromedriver):
//! register, see the secret once, sign in, wait for approval, accept the AUP, download the
//! kubeconfig, and use it against the Kubernetes API emulator in the user's namespace only;
//! another head serves the same session; signing out ends it. Each page is shot as a PNG
//! under `target/tmp/portal-screenshots/` (the HTML itself is validated in `portal`).

use crate::harness::*;
use crate::users::{emulated_cluster, user_client};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// WebDriver key codes.
const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

/// chromedriver, killed on drop.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the screenshots and page sources go: kept after the run, not in git.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("portal-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts chromedriver and a headless chromium that saves downloads into `downloads`.
async fn browser(downloads: &Path) -> (Driver, Client) {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt install chromium chromium-driver (as .ci/run does)"
        );
    }
    let port = free_tcp_addr().port();
    let driver = Driver(
        Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let profile = downloads.parent().unwrap().join("chromium-profile");
    let mut caps = serde_json::Map::new();
    caps.insert("acceptInsecureCerts".into(), json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", format!("--user-data-dir={}", profile.display()),
            ],
            "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            },
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let mut last = None;
    for _ in 0..50 {
        // Plain HTTP to chromedriver on loopback: no TLS stack of the client's own.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let connected = ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&url)
            .await;
        match connected {
            Ok(client) => return (driver, client),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("chromedriver did not start: {last:?}");
}

/// The page now, saved as NAME.png (and its DOM as NAME.html); returns the DOM.
async fn snap(client: &Client, name: &str) -> String {
    let dir = artifacts();
    std::fs::write(
        dir.join(format!("{name}.png")),
        client.screenshot().await.unwrap(),
    )
    .unwrap();
    let source = client.source().await.unwrap();
    std::fs::write(dir.join(format!("{name}.html")), &source).unwrap();
    source
}

/// Waits until the browser is at `path`.
async fn wait_path(client: &Client, path: &str) {
    for _ in 0..100 {
        if client.current_url().await.unwrap().path() == path {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never at {path}: {}", client.current_url().await.unwrap());
}

async fn fill(client: &Client, id: &str, text: &str) {
    let wait = client.wait().at_most(Duration::from_secs(10));
    let field = wait.for_element(Locator::Id(id)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Sends the form whose button `css` names, and waits for the element `id` of the answer.
async fn submit(client: &Client, css: &str, id: &str) -> fantoccini::elements::Element {
    click(client, css).await;
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id(id))
        .await
        .unwrap()
}

/// The page's visible text.
async fn text(client: &Client) -> String {
    client
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_with_only_a_browser_gets_a_working_kubeconfig() {
    within(180, async {
        let dir = tempfile::tempdir().unwrap();
        let (_cluster, kubeconfig) = emulated_cluster(dir.path()).await;
        let kubeconfig = kubeconfig.display().to_string();
        let args = [
            "--kubeconfig",
            &kubeconfig,
            "--auto-approve",
            "false",
            "--portal-title",
            "Edge Lab",
            "--portal-contact",
            "ops@example.org",
        ];
        let a =
            HeadProc::start_named(&dir.path().join("a"), "head-a", free_udp_addr(), &args).await;
        let b =
            HeadProc::start_named(&dir.path().join("b"), "head-b", free_udp_addr(), &args).await;
        let downloads = dir.path().join("downloads");
        std::fs::create_dir_all(&downloads).unwrap();
        let (_driver, client) = browser(&downloads).await;
        let at =
            |head: &HeadProc, path: &str| format!("https://localhost:{}{path}", head.api.port());

        client.goto(&at(&a, "/")).await.unwrap();
        let home = snap(&client, "01-home").await;
        assert!(home.contains("Welcome to Edge Lab"), "{home}");

        // Register: the secret is shown once, with a warning.
        click(&client, "a.button[href='/register']").await;
        fill(&client, "username", "ada").await;
        fill(&client, "email", "ada@example.org").await;
        fill(&client, "full_name", "Ada Lovelace").await;
        let shown = submit(&client, "form[action='/register'] button", "secret").await;
        let secret = shown.text().await.unwrap();
        snap(&client, "02-secret-once").await;
        assert_eq!(secret.len(), 64, "{secret}");
        assert!(text(&client).await.contains("shown only this once"));
        assert!(
            !client
                .current_url()
                .await
                .unwrap()
                .as_str()
                .contains(&secret)
        );

        // A registration error keeps what was typed and names the field.
        client.goto(&at(&a, "/register")).await.unwrap();
        fill(&client, "username", "ada").await;
        fill(&client, "email", "other@example.org").await;
        fill(&client, "full_name", "Ada Again").await;
        submit(&client, "form[action='/register'] button", "username-error").await;
        let taken = snap(&client, "03-register-error").await;
        assert!(taken.contains("Username is already registered"), "{taken}");
        assert!(taken.contains("Ada Again"));

        // Signing in with the keyboard alone: type, Tab to the next field, Enter to send.
        client.goto(&at(&a, "/signin")).await.unwrap();
        let username = client.find(Locator::Id("username")).await.unwrap();
        username
            .send_keys(&format!("ada{TAB}{secret}{ENTER}"))
            .await
            .unwrap();
        wait_path(&client, "/account").await;
        let pending = snap(&client, "04-pending").await;
        assert!(pending.contains("Registration: Pending"), "{pending}");
        assert!(pending.contains("waits for an administrator"));
        assert!(
            !pending.contains(&secret),
            "the secret is never shown again"
        );

        // Approved with the CLI; the AUP is read and accepted.
        ok(a.daemon.cli(&["user", "approve", "ada"]));
        client.refresh().await.unwrap();
        let approved = snap(&client, "05-approved").await;
        assert!(approved.contains("Registration: Approved"), "{approved}");
        assert!(approved.contains("Available once you accept the current Acceptable Use Policy"));
        click(&client, "a.button[href='/aup']").await;
        wait_path(&client, "/aup").await;
        snap(&client, "06-aup").await;
        submit(&client, "form[action='/aup'] button", "accept-error").await;
        let unticked = snap(&client, "07-aup-unticked").await;
        assert!(
            unticked.contains("Tick the box to accept the policy."),
            "{unticked}"
        );
        click(&client, "#accept").await;
        click(&client, "form[action='/aup'] button").await;
        wait_path(&client, "/account").await;
        let ready = snap(&client, "08-kubeconfig-ready").await;
        assert!(ready.contains("your acceptance is valid until"), "{ready}");
        assert!(ready.contains("kubectl --kubeconfig ada-kubeconfig.yaml get pods"));

        // The download works with the kube client in the user's namespace only.
        click(&client, "form[action='/kubeconfig'] button").await;
        let file = downloads.join("ada-kubeconfig.yaml");
        let issued = wait_for("the kubeconfig downloaded", SOON, || {
            std::fs::read_to_string(&file)
                .ok()
                .filter(|t| t.contains("current-context"))
        })
        .await;
        let user = user_client(&issued).await;
        type ConfigMaps = kube::Api<k8s_openapi::api::core::v1::ConfigMap>;
        let own: ConfigMaps = kube::Api::namespaced(user.clone(), "ada");
        own.list(&Default::default()).await.expect("own namespace");
        let other: ConfigMaps = kube::Api::namespaced(user, "default");
        let refused = other.list(&Default::default()).await.unwrap_err();
        assert!(
            matches!(refused, kube::Error::Api(ref e) if e.code == 403),
            "{refused:?}"
        );

        // Another head serves the same session (the browser sends the cookie to localhost).
        client.goto(&at(&b, "/account")).await.unwrap();
        let on_b = snap(&client, "09-other-head").await;
        assert!(on_b.contains("Signed in as"), "{on_b}");
        assert!(on_b.contains("Registration: Approved"));

        // Readable on a phone: nothing wider than the screen.
        client.set_window_size(375, 812).await.unwrap();
        client.refresh().await.unwrap();
        snap(&client, "10-phone").await;
        let fits: Value = client
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(fits, json!(true), "the page scrolls sideways on a phone");
        client.set_window_size(1280, 1000).await.unwrap();

        // Signing out ends the session, on every head.
        click(&client, "form[action='/signout'] button").await;
        wait_path(&client, "/signin").await;
        let out = snap(&client, "11-signed-out").await;
        assert!(!out.contains("Signed in as"), "{out}");
        client.goto(&at(&a, "/account")).await.unwrap();
        assert!(client.current_url().await.unwrap().path() == "/signin");
        client.goto(&at(&b, "/account")).await.unwrap();
        assert!(client.current_url().await.unwrap().path() == "/signin");

        // A wrong secret and an unknown user read the same.
        let mut said = Vec::new();
        for name in ["ada", "nobody"] {
            client.goto(&at(&a, "/signin")).await.unwrap();
            fill(&client, "username", name).await;
            fill(&client, "secret", &"0".repeat(64)).await;
            let error = submit(&client, "form[action='/signin'] button", "signin-error").await;
            said.push(error.text().await.unwrap());
        }
        snap(&client, "12-wrong-secret").await;
        assert_eq!(said[0], said[1]);
        client.close().await.unwrap();
    })
    .await;
}
