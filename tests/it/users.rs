//! The head's HTTPS API for people, against a real head process: registration and its
//! refusals, the AUP, approval from the CLI, and kubeconfigs that work in the user's namespace
//! only, against the Kubernetes API emulator.

use crate::harness::*;
use crate::kube_api::KubeApi;
use reqwest::StatusCode;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use std::time::Duration;

/// An HTTPS client that trusts only the head's CA.
pub(crate) fn client(head: &HeadProc) -> reqwest::Client {
    let pem = std::fs::read(head.state.join("ca.crt")).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let tls = edgesync::transport::tls::https_client_config(&der).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}

/// The head's user API, as a client calls it.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub(crate) fn new(head: &HeadProc) -> Api {
        Api {
            http: client(head),
            base: format!("https://localhost:{}", head.api.port()),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub(crate) async fn register(&self, username: &str, email: &str) -> (StatusCode, Value) {
        let body = json!({"username": username, "email": email, "fullName": "Ada Lovelace"});
        self.send(
            self.http
                .post(self.url("/api/v1/registrations"))
                .json(&body),
        )
        .await
    }

    pub(crate) async fn get(&self, path: &str, secret: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path)).bearer_auth(secret))
            .await
    }

    async fn accept(&self, username: &str, secret: &str) -> (StatusCode, Value) {
        let (_, aup) = self.get("/api/v1/aup", "").await;
        let body = json!({"accept": true, "version": aup["version"]});
        let url = self.url(&format!("/api/v1/users/{username}/aup"));
        self.send(self.http.post(url).bearer_auth(secret).json(&body))
            .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refusals_and_the_aup_on_a_standalone_head() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let api = Api::new(&head);

        let (status, body) = api.register("ada", "ada@example.org").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(
            body["status"], "Pending",
            "registrations wait for an administrator by default"
        );
        let secret = body["secret"].as_str().unwrap().to_string();
        let (status, body) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let said = ok(head.daemon.cli(&["user", "approve", "ada"]));
        assert!(said.contains("is now Approved"), "{said}");
        let again = ok(head.daemon.cli(&["user", "approve", "ada"]));
        assert!(again.contains("is already Approved"), "{again}");
        let (_, body) = api.get("/api/v1/users/ada", &secret).await;
        assert_eq!(body["status"], "Approved", "{body}");

        for (username, email, field) in [
            ("ada", "other@example.org", "username"),
            ("bob", "ADA@example.org", "email"),
        ] {
            let (status, body) = api.register(username, email).await;
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(body["field"], field, "{body}");
        }
        for (username, email, field) in [
            ("Ada_L", "x@example.org", "username"),
            ("kube-system", "k@example.org", "username"),
            ("default", "d@example.org", "username"),
            ("edgesync-system", "e@example.org", "username"),
            ("bob", "not-an-address", "email"),
        ] {
            let (status, body) = api.register(username, email).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(body["field"], field, "{body}");
        }
        let unknown =
            json!({"username": "bob", "email": "b@example.org", "fullName": "B", "admin": true});
        let (status, body) = api
            .send(
                api.http
                    .post(api.url("/api/v1/registrations"))
                    .json(&unknown),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["field"], "admin", "{body}");
        let missing = json!({"username": "bob", "email": "b@example.org"});
        let (status, body) = api
            .send(
                api.http
                    .post(api.url("/api/v1/registrations"))
                    .json(&missing),
            )
            .await;
        assert_eq!(
            (status, &body["field"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &json!("fullName")),
            "{body}"
        );
        let huge =
            json!({"username": "bob", "email": "b@example.org", "fullName": "x".repeat(20_000)});
        let (status, body) = api
            .send(api.http.post(api.url("/api/v1/registrations")).json(&huge))
            .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

        // Wrong, missing, or someone else's secret: 401, the same for users that do not exist.
        let (status, wrong) = api.get("/api/v1/users/ada", "nope").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, nobody) = api.get("/api/v1/users/nobody", &secret).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong, nobody);
        let (status, body) = api.get("/api/v1/users/ada", &secret).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["aup"]["valid"], false);

        let (status, aup) = api.get("/api/v1/aup", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            aup["text"]
                .as_str()
                .unwrap()
                .contains("Acceptable Use Policy")
        );
        let stale = json!({"accept": true, "version": aup["version"].as_i64().unwrap() + 1});
        let (status, body) = api
            .send(
                api.http
                    .post(api.url("/api/v1/users/ada/aup"))
                    .bearer_auth(&secret)
                    .json(&stale),
            )
            .await;
        assert_eq!(
            (status, &body["field"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &json!("version"))
        );
        let (status, body) = api.accept("ada", &secret).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["aup"]["valid"], true);
        assert!(body["aup"]["expiresAt"].is_string());

        // Without a cluster there are no cluster credentials; everything else works.
        let (status, body) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");

        // A new policy must be accepted again; it all survives a restart.
        let policy = write(dir.path(), "aup.txt", "Version two of the rules.\n");
        let socket = head.daemon.socket.display().to_string();
        ok(cli(&["aup", "set", "-f", &policy, "--socket", &socket]));
        let (_, body) = api.get("/api/v1/users/ada", &secret).await;
        assert_eq!(body["aup"]["valid"], false, "{body}");
        head.daemon.stop().await;
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let api = Api::new(&head);
        let (_, aup) = api.get("/api/v1/aup", "").await;
        assert_eq!(aup["text"], "Version two of the rules.\n");
        let (status, body) = api.get("/api/v1/users/ada", &secret).await;
        assert_eq!(
            (status, &body["status"]),
            (StatusCode::OK, &json!("Approved"))
        );

        // The audit trail says who did what, oldest first; a refused kubeconfig is not in it.
        let trail = head.daemon.json(&["audit", "-o", "json"]);
        let said: Vec<(String, String)> = trail
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["action"].as_str().unwrap().into(),
                    r["subject"].as_str().unwrap().into(),
                )
            })
            .collect();
        let at = |action: &str, subject: &str| {
            said.iter()
                .position(|(a, s)| a == action && s == subject)
                .unwrap_or_else(|| panic!("no {action} of {subject} in {trail}"))
        };
        assert!(at("register", "ada") < at("approved", "ada"), "{trail}");
        assert!(at("approved", "ada") < at("aup-accept", "ada"), "{trail}");
        assert!(at("aup-accept", "ada") < at("aup-set", "aup"), "{trail}");
        assert!(
            !said.iter().any(|(a, _)| a.starts_with("access")),
            "{trail}"
        );
        let approved = &trail[at("approved", "ada")];
        assert!(
            approved["actor"].as_str().unwrap().starts_with("admin:"),
            "{approved}"
        );
        let recent = head.daemon.json(&["audit", "--since", "1h", "-o", "json"]);
        assert_eq!(recent, trail);
        let table = ok(head.daemon.cli(&["audit"]));
        assert!(
            table.starts_with("TIME") && table.contains("aup-set"),
            "{table}"
        );
        let bad = head.daemon.cli(&["audit", "--since", "soon"]);
        assert_eq!(bad.status.code(), Some(2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfigs_work_in_the_users_namespace_only_until_access_ends() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, kubeconfig) = emulated_cluster(dir.path()).await;
        let kubeconfig = kubeconfig.display().to_string();
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &[
                "--kubeconfig",
                &kubeconfig,
                "--auto-approve",
                "false",
                "--aup-validity",
                "4s",
            ],
        )
        .await;
        let api = Api::new(&head);
        let socket = head.daemon.socket.display().to_string();

        let (_, body) = api.register("ada", "ada@example.org").await;
        assert_eq!(body["status"], "Pending");
        let secret = body["secret"].as_str().unwrap().to_string();
        api.accept("ada", &secret).await;
        let (status, body) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "not approved yet: {body}");

        ok(cli(&["user", "approve", "ada", "--socket", &socket]));
        let listed: Value = serde_json::from_str(&ok(cli(&[
            "user", "list", "-o", "json", "--socket", &socket,
        ])))
        .unwrap();
        assert_eq!(listed[0]["status"], "Approved");
        let (status, body) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let issued = body.as_str().unwrap().to_string();

        // The kubeconfig works with the kube client in the user's namespace, not in another.
        let user = user_client(&issued).await;
        let own: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(user.clone(), "ada");
        own.list(&Default::default()).await.expect("own namespace");
        let other: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(user.clone(), "default");
        let refused = other.list(&Default::default()).await.unwrap_err();
        assert!(
            matches!(refused, kube::Error::Api(ref e) if e.code == 403),
            "{refused:?}"
        );

        // The acceptance expires: the RoleBinding goes and the same token stops working.
        wait_for("access removed when the AUP expired", SOON, || {
            role_binding(&cluster, "ada").is_none().then_some(())
        })
        .await;
        let refused = own.list(&Default::default()).await.unwrap_err();
        assert!(
            matches!(refused, kube::Error::Api(ref e) if e.code == 403),
            "{refused:?}"
        );
        let (status, _) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // Renewed, then revoked by an administrator: access ends at once.
        api.accept("ada", &secret).await;
        let (status, _) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::OK);
        ok(cli(&["user", "revoke", "ada", "--socket", &socket]));
        assert!(role_binding(&cluster, "ada").is_none());

        // An acceptance that expires while the head is down is handled when it starts.
        ok(cli(&["user", "approve", "ada", "--socket", &socket]));
        api.accept("ada", &secret).await;
        let (status, _) = api.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::OK);
        head.daemon.stop().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(role_binding(&cluster, "ada").is_some());
        let head =
            HeadProc::start(dir.path(), free_udp_addr(), &["--kubeconfig", &kubeconfig]).await;
        wait_for("expired access removed at start", SOON, || {
            role_binding(&cluster, "ada").is_none().then_some(())
        })
        .await;

        // A namespace that exists already and was not made for the user is not handed over.
        cluster.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bob"}}));
        let api = Api::new(&head);
        let (_, body) = api.register("bob", "bob@example.org").await;
        let bob = body["secret"].as_str().unwrap().to_string();
        api.accept("bob", &bob).await;
        let (status, body) = api.get("/api/v1/users/bob/kubeconfig", &bob).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(role_binding(&cluster, "bob").is_none());
    })
    .await;
}

/// The Kubernetes API emulator with the heads' namespace, and an administrator's kubeconfig
/// for it written into `dir`.
pub(crate) async fn emulated_cluster(dir: &std::path::Path) -> (KubeApi, std::path::PathBuf) {
    let cluster = KubeApi::start().await;
    cluster.put(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "edgesync-system"}}),
    );
    let kubeconfig = dir.join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig);
    (cluster, kubeconfig)
}

/// A kube client that acts with `kubeconfig` (as issued to a user).
pub(crate) async fn user_client(kubeconfig: &str) -> kube::Client {
    let file: kube::config::Kubeconfig = serde_saphyr::from_str(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_a_configured_certificate() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        // An operator's own CA and server certificate for api.example.org.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["api.example.org".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let cert_file = write(dir.path(), "api.crt", &cert.pem());
        let key_file = write(dir.path(), "api.key", &key.serialize_pem());
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &["--api-cert", &cert_file, "--api-key", &key_file],
        )
        .await;
        let tls = edgesync::transport::tls::https_client_config(ca_cert.der()).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .resolve("api.example.org", head.api)
            .build()
            .unwrap();
        let url = format!("https://api.example.org:{}/api/v1/aup", head.api.port());
        let response = http.get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // A client that trusts only the head's own CA refuses it.
        let url = format!("https://localhost:{}/healthz", head.api.port());
        assert!(client(&head).get(url).send().await.is_err());
    })
    .await;
}

/// A head of `cluster` in `dir/name`, whose registrations wait for an administrator.
async fn cluster_head(dir: &std::path::Path, name: &str, kubeconfig: &str) -> HeadProc {
    let args = ["--kubeconfig", kubeconfig, "--auto-approve", "false"];
    HeadProc::start_named(&dir.join(name), name, free_udp_addr(), &args).await
}

fn role_binding(cluster: &KubeApi, namespace: &str) -> Option<Value> {
    cluster.get(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        Some(namespace),
        "edgesync-user",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_any_head_serves_any_user_and_nothing_lives_in_a_state_dir() {
    use kube::api::{Patch, PatchParams};
    use sha2::Digest;
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, kubeconfig_path) = emulated_cluster(dir.path()).await;
        let kubeconfig = kubeconfig_path.display().to_string();
        let a = cluster_head(dir.path(), "head-a", &kubeconfig).await;
        let b = cluster_head(dir.path(), "head-b", &kubeconfig).await;
        let (api_a, api_b) = (Api::new(&a), Api::new(&b));

        // Registered through head A: a User resource holding the secret's hash only.
        let (status, body) = api_a.register("ada", "ada@example.org").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["status"], "Pending");
        let secret = body["secret"].as_str().unwrap().to_string();
        let object = cluster
            .get(API_VERSION, "User", None, "ada")
            .expect("User ada");
        assert_eq!(object["spec"]["approval"], "Pending");
        assert_eq!(object["spec"]["email"], "ada@example.org");
        let hashed = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
        assert_eq!(object["status"]["secretSHA256"], hashed.as_str());
        assert!(!object.to_string().contains(&secret), "{object}");
        let aup = cluster
            .get(API_VERSION, "AcceptableUsePolicy", None, "v1")
            .expect("AUP v1");
        assert_eq!(aup["spec"]["version"], 1);

        // Head B knows the name, the address and the secret.
        for (username, email, field) in [
            ("ada", "other@example.org", "username"),
            ("bob", "ADA@example.org", "email"),
        ] {
            let (status, body) = api_b.register(username, email).await;
            assert_eq!(
                (status, &body["field"]),
                (StatusCode::CONFLICT, &json!(field)),
                "{body}"
            );
        }
        assert!(
            cluster.get(API_VERSION, "User", None, "bob").is_none(),
            "the refused registration is gone"
        );
        let (status, body) = api_b.get("/api/v1/users/ada", &secret).await;
        assert_eq!(
            (status, &body["status"]),
            (StatusCode::OK, &json!("Pending")),
            "{body}"
        );
        let (status, wrong) = api_b.get("/api/v1/users/ada", "nope").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (_, nobody) = api_b.get("/api/v1/users/nobody", &secret).await;
        assert_eq!(wrong, nobody);

        // An administrator approves with kubectl: every head sees it.
        let admin = admin_client(&kubeconfig_path).await;
        let users: kube::Api<edgesync::crd::user::User> = kube::Api::all(admin);
        users
            .patch(
                "ada",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"approval": "Approved"}})),
            )
            .await
            .unwrap();
        let (_, body) = api_b.get("/api/v1/users/ada", &secret).await;
        assert_eq!(body["status"], "Approved", "{body}");
        let listed = a.daemon.json(&["user", "list", "-o", "json"]);
        assert_eq!(listed[0]["status"], "Approved", "{listed}");

        // The AUP accepted and a kubeconfig issued through head B.
        let (status, body) = api_b.accept("ada", &secret).await;
        assert_eq!(
            (status, &body["aup"]["valid"]),
            (StatusCode::OK, &json!(true)),
            "{body}"
        );
        let (status, body) = api_b.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(role_binding(&cluster, "ada").is_some());
        let object = cluster.get(API_VERSION, "User", None, "ada").unwrap();
        assert_eq!(object["status"]["accessGranted"], true, "{object}");
        assert_eq!(object["status"]["aup"]["version"], 1, "{object}");

        // Revoked on head B: access is gone, also for head A.
        ok(b.daemon.cli(&["user", "revoke", "ada"]));
        assert!(role_binding(&cluster, "ada").is_none());
        let (status, _) = api_a.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (_, body) = api_a.get("/api/v1/users/ada", &secret).await;
        assert_eq!(body["status"], "Revoked", "{body}");

        // Approved again on head A; a new AUP published on head A is what head B serves, and
        // the access of the new policy's non-acceptors ends on its own.
        ok(a.daemon.cli(&["user", "approve", "ada"]));
        let (status, _) = api_a.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::OK);
        let policy = write(dir.path(), "aup.txt", "Version two of the rules.\n");
        ok(a.daemon.cli(&["aup", "set", "-f", &policy]));
        let (_, aup) = api_b.get("/api/v1/aup", "").await;
        assert_eq!(
            (&aup["version"], &aup["text"]),
            (&json!(2), &json!("Version two of the rules.\n"))
        );
        wait_for("access removed for the new AUP", SOON, || {
            role_binding(&cluster, "ada").is_none().then_some(())
        })
        .await;
        let (status, body) = api_b.accept("ada", &secret).await;
        assert_eq!(
            (status, &body["aup"]["version"]),
            (StatusCode::OK, &json!(2)),
            "{body}"
        );

        // Who did what, as Events on the User.
        let events = cluster.list("events.k8s.io/v1", "Event");
        let reasons: Vec<&str> = events
            .iter()
            .filter(|e| e["regarding"]["kind"] == "User" && e["regarding"]["name"] == "ada")
            .map(|e| e["reason"].as_str().unwrap())
            .collect();
        for reason in [
            "Registered",
            "AUPAccepted",
            "AccessGranted",
            "Revoked",
            "AccessRemoved",
            "Approved",
        ] {
            assert!(reasons.contains(&reason), "no {reason} in {reasons:?}");
        }
        assert!(
            events
                .iter()
                .all(|e| e["reportingController"] == "edgesync-head")
        );

        // One address registered on both heads at the same moment: never two users.
        for i in 0..5 {
            let email = format!("same{i}@example.org");
            let (name_a, name_b) = (format!("a{i}"), format!("b{i}"));
            let (first, second) = tokio::join!(
                api_a.register(&name_a, &email),
                api_b.register(&name_b, &email)
            );
            let created = [&first, &second]
                .iter()
                .filter(|(s, _)| *s == StatusCode::CREATED)
                .count();
            for (status, body) in [&first, &second] {
                assert!(
                    matches!(*status, StatusCode::CREATED | StatusCode::CONFLICT),
                    "{body}"
                );
            }
            let holders = cluster
                .list(API_VERSION, "User")
                .into_iter()
                .filter(|u| u["spec"]["email"] == email.as_str())
                .count();
            assert!(
                created <= 1 && holders == created,
                "{first:?} {second:?}: {holders} users"
            );
        }

        // Every head's state dir is lost; fresh heads serve the user as before.
        a.daemon.stop().await;
        b.daemon.stop().await;
        for name in ["head-a", "head-b"] {
            std::fs::remove_dir_all(dir.path().join(name)).unwrap();
        }
        let c = cluster_head(dir.path(), "head-c", &kubeconfig).await;
        let api_c = Api::new(&c);
        let (status, body) = api_c.get("/api/v1/users/ada", &secret).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            (
                &body["status"],
                &body["aup"]["version"],
                &body["aup"]["valid"]
            ),
            (&json!("Approved"), &json!(2), &json!(true)),
            "{body}"
        );
        let (status, body) = api_c.get("/api/v1/users/ada/kubeconfig", &secret).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(role_binding(&cluster, "ada").is_some());
        let (status, _) = api_c.register("ada", "new@example.org").await;
        assert_eq!(status, StatusCode::CONFLICT);

        // Revoked with kubectl: the head removes access on its own.
        users
            .patch(
                "ada",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"approval": "Revoked"}})),
            )
            .await
            .unwrap();
        wait_for("access removed after kubectl revoked", SOON, || {
            role_binding(&cluster, "ada").is_none().then_some(())
        })
        .await;
        let (_, body) = api_c.get("/api/v1/users/ada", &secret).await;
        assert_eq!(body["status"], "Revoked", "{body}");
    })
    .await;
}

const API_VERSION: &str = "edgesync.io/v1alpha1";

async fn admin_client(kubeconfig: &std::path::Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}
