//! The user portal against a real head, over HTTPS: its forms are refused without their token,
//! its pages carry their security headers, a wrong secret and an unknown user look the same,
//! sign-ins are limited, and signing out ends the session on the server (the old cookie no
//! longer works). The whole journey in a real browser is in `browser`.

use crate::harness::*;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, SET_COOKIE};
use std::collections::BTreeMap;

/// A visitor without a browser: keeps cookies, follows no redirect.
pub(crate) struct Visitor {
    http: reqwest::Client,
    base: String,
    cookies: BTreeMap<String, String>,
}

/// One answer: status, headers and page.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The value of the form token field on the page.
    pub(crate) fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a form token")
            + 19;
        self.body[at..at + 64].to_string()
    }

    pub(crate) fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The text of the first element with class "error", or "".
    pub(crate) fn error(&self) -> &str {
        self.body
            .split_once("class=\"error\"")
            .and_then(|(_, rest)| rest.split_once('>'))
            .and_then(|(_, rest)| rest.split_once('<'))
            .map_or("", |(text, _)| text)
    }
}

impl Visitor {
    pub(crate) fn new(head: &HeadProc) -> Visitor {
        let pem = std::fs::read(head.state.join("ca.crt")).unwrap();
        let der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
        };
        let tls = edgesync::transport::tls::https_client_config(&der).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Visitor {
            http,
            base: format!("https://localhost:{}", head.api.port()),
            cookies: BTreeMap::new(),
        }
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Answer {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let request = match cookie.is_empty() {
            true => request,
            false => request.header("cookie", cookie),
        };
        let response = request.send().await.unwrap();
        for set in response.headers().get_all(SET_COOKIE) {
            let set = set.to_str().unwrap();
            let (pair, attributes) = set.split_once(';').unwrap_or((set, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") || value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Answer {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(request).await
    }

    pub(crate) async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let request = self.http.post(format!("{}{path}", self.base)).form(form);
        self.send(request).await
    }

    /// Registers `username` through the form; returns the secret shown.
    pub(crate) async fn register(&mut self, username: &str) -> String {
        let csrf = self.get("/register").await.csrf();
        let email = format!("{username}@example.org");
        let form = [
            ("csrf", csrf.as_str()),
            ("username", username),
            ("email", email.as_str()),
            ("full_name", "Ada Lovelace"),
        ];
        let page = self.post("/register", &form).await;
        assert_eq!(page.status, StatusCode::CREATED, "{}", page.body);
        let at = page.body.find("class=\"secret\">").unwrap() + 15;
        page.body[at..at + 64].to_string()
    }

    pub(crate) async fn sign_in(&mut self, username: &str, secret: &str) -> Answer {
        let csrf = self.get("/signin").await.csrf();
        let form = [
            ("csrf", csrf.as_str()),
            ("username", username),
            ("secret", secret),
        ];
        self.post("/signin", &form).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_forms_need_their_token_and_pages_their_headers() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &[
                "--portal-title",
                "Edge Lab",
                "--portal-contact",
                "ops@example.org",
            ],
        )
        .await;
        let mut visitor = Visitor::new(&head);
        let page = visitor.get("/register").await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            page.body.contains("<title>Register · Edge Lab</title>"),
            "{}",
            page.body
        );
        assert!(page.body.contains("mailto:ops@example.org"));
        let header = |name: &str| {
            page.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("cache-control"), "no-store");
        let set_cookie = header("set-cookie");
        for flag in [
            "__Host-edgesync-csrf=",
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
        ] {
            assert!(set_cookie.contains(flag), "{flag} in {set_cookie}");
        }
        assert!(!page.body.contains("<script"), "no script");
        assert!(!page.body.contains("style="), "no inline style");

        // Without the form's token (another site posting it), nothing is registered.
        let form = [
            ("username", "mallory"),
            ("email", "m@example.org"),
            ("full_name", "M"),
        ];
        let refused = visitor.post("/register", &form).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
        let forged = [("csrf", "00".repeat(32)), ("username", "mallory".into())];
        let forged: Vec<(&str, &str)> = forged.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            visitor.post("/register", &forged).await.status,
            StatusCode::FORBIDDEN
        );
        let users = ok(head.daemon.cli(&["user", "list", "-o", "json"]));
        assert!(!users.contains("mallory"), "{users}");

        // A form error names the field and keeps what was typed.
        let csrf = page.csrf();
        let bad = [
            ("csrf", csrf.as_str()),
            ("username", "ada"),
            ("email", "not-an-address"),
            ("full_name", "Ada Lovelace"),
        ];
        let again = visitor.post("/register", &bad).await;
        assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            again
                .body
                .contains("E-mail address is not an e-mail address"),
            "{}",
            again.body
        );
        assert!(
            again.body.contains("value=\"ada\"") && again.body.contains("value=\"Ada Lovelace\"")
        );
        assert!(again.body.contains("value=\"not-an-address\""));

        // The secret is shown once, on a page nothing keeps, and in no log.
        let secret = visitor.register("ada").await;
        let log = std::fs::read_to_string(&head.daemon.log).unwrap();
        assert!(!log.contains(&secret), "the secret is in the log");
        assert!(!visitor.get("/account").await.body.contains(&secret));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_and_an_unknown_user_look_the_same_and_sign_out_ends_the_session() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let mut visitor = Visitor::new(&head);
        let secret = visitor.register("ada").await;

        let wrong = visitor.sign_in("ada", &"0".repeat(64)).await;
        let unknown = visitor.sign_in("nobody", &"0".repeat(64)).await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            (wrong.status, wrong.error()),
            (unknown.status, unknown.error())
        );
        assert_eq!(
            wrong.error(),
            "The username or the sign-in secret is wrong."
        );
        assert!(
            !wrong.body.contains(&"0".repeat(64)),
            "the secret is not kept in the form"
        );
        assert!(wrong.body.contains("value=\"ada\""), "the username is");

        // Signed in: the Pending page, in words, with what happens next.
        let signed_in = visitor.sign_in("ada", &secret).await;
        assert_eq!(signed_in.status, StatusCode::SEE_OTHER);
        assert_eq!(signed_in.location(), "/account");
        let session = visitor.cookies["__Host-edgesync-session"].clone();
        let account = visitor.get("/account").await;
        assert_eq!(account.status, StatusCode::OK);
        assert!(
            account.body.contains("Registration: Pending"),
            "{}",
            account.body
        );
        assert!(account.body.contains("waits for an administrator"));
        assert!(
            account
                .body
                .contains("Available once an administrator approves")
        );

        // Signing out ends it on the server: the old cookie, sent again, is refused.
        let csrf = account.csrf();
        let out = visitor.post("/signout", &[("csrf", &csrf)]).await;
        assert_eq!(out.status, StatusCode::SEE_OTHER);
        assert!(!visitor.cookies.contains_key("__Host-edgesync-session"));
        visitor
            .cookies
            .insert("__Host-edgesync-session".into(), session);
        let replayed = visitor.get("/account").await;
        assert_eq!(replayed.status, StatusCode::SEE_OTHER);
        assert_eq!(replayed.location(), "/signin");

        // Failed sign-ins are limited per user, with the same answer for an unknown one.
        let mut last = None;
        for name in ["ada", "nobody"] {
            for _ in 0..6 {
                last = Some(visitor.sign_in(name, &"1".repeat(64)).await);
            }
            let limited = last.take().unwrap();
            assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{name}");
            assert!(
                limited.error().starts_with("Too many sign-in attempts."),
                "{name}"
            );
        }
        // Also the right secret waits now.
        let held = visitor.sign_in("ada", &secret).await;
        assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
    })
    .await;
}

/// Checks `pages` (name, HTML) with html-validate (the HTML standard, accessibility and
/// document rules), as `.ci/run` installs it; keeps them under `target/tmp/portal-pages/`.
fn validate(pages: &[(&str, String)]) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tool = root.join(".ci/node/node_modules/.bin/html-validate");
    assert!(
        tool.exists(),
        "html-validate is missing: npm ci --prefix .ci/node (as .ci/run does)"
    );
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("portal-pages");
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (name, html) in pages {
        let file = dir.join(format!("{name}.html"));
        std::fs::write(&file, html).unwrap();
        files.push(file);
    }
    let out = std::process::Command::new(tool)
        .arg("--config")
        .arg(root.join(".ci/node/htmlvalidate.json"))
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "invalid HTML:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_portal_page_is_valid_html() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &[
                "--auto-approve",
                "false",
                "--portal-contact",
                "ops@example.org",
            ],
        )
        .await;
        let mut v = Visitor::new(&head);
        let mut pages = vec![("home", v.get("/").await.body)];
        let register = v.get("/register").await;
        let csrf = register.csrf();
        pages.push(("register", register.body));
        let bad = [
            ("csrf", csrf.as_str()),
            ("username", "Ada!"),
            ("email", "x"),
            ("full_name", ""),
        ];
        pages.push(("register-error", v.post("/register", &bad).await.body));
        pages.push(("refused-form", v.post("/register", &bad[1..]).await.body));
        let form = [
            ("csrf", csrf.as_str()),
            ("username", "ada"),
            ("email", "ada@example.org"),
            ("full_name", "Ada Lovelace"),
        ];
        let registered = v.post("/register", &form).await;
        let at = registered.body.find("class=\"secret\">").unwrap() + 15;
        let secret = registered.body[at..at + 64].to_string();
        pages.push(("registered", registered.body));
        pages.push(("signin", v.get("/signin").await.body));
        pages.push(("signin-error", v.sign_in("ada", &"0".repeat(64)).await.body));
        v.sign_in("ada", &secret).await;
        pages.push(("account-pending", v.get("/account").await.body));
        ok(head.daemon.cli(&["user", "approve", "ada"]));
        let account = v.get("/account").await;
        assert!(account.body.contains("Registration: Approved"));
        pages.push(("account-approved", account.body));
        let aup = v.get("/aup").await;
        let csrf = aup.csrf();
        pages.push(("aup", aup.body));
        let unticked = v.post("/aup", &[("csrf", &csrf), ("version", "1")]).await;
        pages.push(("aup-unticked", unticked.body));
        let accepted = v
            .post(
                "/aup",
                &[("csrf", &csrf), ("version", "1"), ("accept", "yes")],
            )
            .await;
        assert_eq!(accepted.location(), "/account");
        let account = v.get("/account").await;
        assert!(
            account.body.contains("runs without a Kubernetes cluster"),
            "{}",
            account.body
        );
        pages.push(("account-accepted", account.body));
        pages.push(("aup-accepted", v.get("/aup").await.body));
        validate(&pages);
    })
    .await;
}
