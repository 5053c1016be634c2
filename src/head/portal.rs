//! The user portal on the head's HTTPS listener: register, sign in, see where the
//! registration stands, accept the Acceptable Use Policy and download a kubeconfig, in plain
//! server-rendered pages without JavaScript. Every rule is the JSON API's, through the same
//! calls ([`Users`](super::users::Users) and [`Accounts`]); this module only turns forms into
//! those calls and their answers into pages.

pub mod session;

use super::api::Accounts;
use super::users::{Registration, Status, User, UserError};
use askama::Template;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use serde::Deserialize;
use session::{CSRF_COOKIE, Keys, Limiter, SESSION_COOKIE};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How long before an acceptance expires the portal asks to renew it.
const RENEW_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// What the portal's pages share.
#[derive(Clone)]
pub struct Portal {
    accounts: Accounts,
    keys: Keys,
    limiter: Arc<Limiter>,
    title: String,
    contact: Option<String>,
}

impl Portal {
    /// The portal of `accounts`; `keys` sign its sessions; `title` and `contact` are shown on
    /// every page.
    pub fn new(accounts: Accounts, keys: Keys, title: String, contact: Option<String>) -> Self {
        Portal {
            accounts,
            keys,
            limiter: Arc::default(),
            title,
            contact,
        }
    }

    /// The portal's routes, with their security headers.
    pub fn routes(self) -> Router {
        Router::new()
            .route("/", get(home))
            .route("/register", get(register_form).post(register))
            .route("/signin", get(signin_form).post(signin))
            .route("/signout", post(signout))
            .route("/account", get(account))
            .route("/aup", get(aup_page).post(accept))
            .route("/kubeconfig", post(kubeconfig))
            .route("/portal.css", get(stylesheet))
            .layer(axum::middleware::from_fn(headers))
            .with_state(self)
    }
}

/// Every page: no framing, no inline script or style, nothing cached (pages hold secrets and
/// credentials), no referrer.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in set {
        h.insert(name, HeaderValue::from_static(value));
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The pages' one stylesheet.
const CSS: &str = include_str!("../../templates/portal/portal.css");

/// Its Subresource Integrity digest, which every page names.
fn css_integrity() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let digest = sha2::Sha384::digest(CSS.as_bytes());
        format!(
            "sha384-{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    })
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// What every page shows: the portal's name and contact, who is signed in, and the token its
/// forms carry.
struct Layout {
    css_integrity: &'static str,
    title: String,
    contact: Option<String>,
    user: Option<String>,
    csrf: String,
}

/// One request's visitor: their cookies (with a CSRF cookie made if they had none) and, if
/// their session holds, who they are.
struct Visit {
    jar: CookieJar,
    csrf_cookie: String,
    user: Option<User>,
}

fn secure_cookie(name: &'static str, value: String, max_age: Option<Duration>) -> Cookie<'static> {
    let mut cookie = Cookie::new(name, value);
    cookie.set_http_only(true);
    cookie.set_secure(true);
    cookie.set_same_site(SameSite::Strict);
    cookie.set_path("/");
    if let Some(age) = max_age {
        cookie.set_max_age(cookie::time::Duration::seconds(age.as_secs() as i64));
    }
    cookie
}

fn gone(name: &'static str) -> Cookie<'static> {
    let mut cookie = secure_cookie(name, String::new(), None);
    cookie.make_removal();
    cookie
}

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

impl Portal {
    async fn visit(&self, jar: CookieJar) -> Visit {
        let (mut jar, csrf_cookie) = match jar.get(CSRF_COOKIE).map(|c| c.value().to_string()) {
            Some(value) if value.len() == 64 => (jar, value),
            _ => {
                let value = hex::encode(crate::transport::tls::random_bytes::<32>());
                (
                    jar.add(secure_cookie(CSRF_COOKIE, value.clone(), None)),
                    value,
                )
            }
        };
        let mut user = None;
        if let Some(cookie) = jar.get(SESSION_COOKIE).map(|c| c.value().to_string()) {
            match self.session_user(&cookie).await {
                Ok(Some(found)) => user = Some(found),
                Ok(None) => jar = jar.add(gone(SESSION_COOKIE)),
                // The users cannot be read now: not signed in for this page, but the session
                // stays for the next.
                Err(e) => warn!(error = %e, "cannot check a portal session"),
            }
        }
        Visit {
            jar,
            csrf_cookie,
            user,
        }
    }

    /// The user whose session `cookie` holds, if it still does: signed with the heads' key
    /// and unexpired (checked before anything is looked up), for the registration that holds
    /// the name now, and not signed out since.
    async fn session_user(&self, cookie: &str) -> Result<Option<User>, UserError> {
        let Some(session) = self.keys.open(cookie, now_ms()) else {
            return Ok(None);
        };
        let user = match self.accounts.users.get(&session.username).await {
            Ok(user) => user,
            Err(UserError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let holds =
            user.uid == session.uid && !session::outlived(session.issued_ms, user.signed_out_at);
        Ok(holds.then_some(user))
    }

    fn layout(&self, visit: &Visit) -> Layout {
        Layout {
            css_integrity: css_integrity(),
            title: self.title.clone(),
            contact: self.contact.clone(),
            user: visit.user.as_ref().map(|u| u.username.clone()),
            csrf: self.keys.form_token(&visit.csrf_cookie),
        }
    }

    /// The visit of a posted form, or its refusal when the form lacks the token of this
    /// visitor's CSRF cookie (sent from another site, or an old page).
    async fn posted(&self, jar: CookieJar, token: &str) -> Result<Visit, Response> {
        let visit = self.visit(jar).await;
        let ok = visit
            .jar
            .get(CSRF_COOKIE)
            .is_some_and(|c| self.keys.form_token_matches(c.value(), token));
        match ok {
            true => Ok(visit),
            false => Err(refused_form(self, visit)),
        }
    }
}

/// The visit's signed-in user, or the way to the sign-in page.
// The error is a response like the answer it replaces, not worth a box.
#[allow(clippy::result_large_err)]
fn signed_in(visit: Visit) -> Result<(User, Visit), Response> {
    match visit.user.clone() {
        Some(user) => Ok((user, visit)),
        None => Err((visit.jar, Redirect::to("/signin")).into_response()),
    }
}

/// A handler's answer: a page either way.
type Answer = Result<Response, Response>;

/// A rendered page with its status and the visitor's cookies.
fn page(visit: Visit, status: StatusCode, template: impl Template) -> Response {
    match template.render() {
        Ok(html) => (status, visit.jar, Html(html)).into_response(),
        Err(e) => {
            warn!(error = %e, "cannot render a portal page");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "portal/message.html")]
struct MessagePage {
    l: Layout,
    heading: String,
    message: String,
    next: &'static str,
    next_label: &'static str,
}

/// A page that only says something, with a link on.
fn message(
    portal: &Portal,
    visit: Visit,
    status: StatusCode,
    heading: &str,
    text: String,
) -> Response {
    let l = portal.layout(&visit);
    let (next, next_label) = match l.user {
        Some(_) => ("/account", "Back to your account"),
        None => ("/", "Back to the start"),
    };
    let body = MessagePage {
        l,
        heading: heading.into(),
        message: text,
        next,
        next_label,
    };
    page(visit, status, body)
}

/// The answer to a form without this visitor's token: from another site, or an old page.
fn refused_form(portal: &Portal, visit: Visit) -> Response {
    let text = "This form was not sent from this site's current page (its security token is \
                missing or expired). Go back, reload the page and send it again."
        .into();
    message(portal, visit, StatusCode::FORBIDDEN, "Form refused", text)
}

#[derive(Template)]
#[template(path = "portal/home.html")]
struct HomePage {
    l: Layout,
}

async fn home(State(portal): State<Portal>, jar: CookieJar) -> Response {
    let visit = portal.visit(jar).await;
    if visit.user.is_some() {
        return (visit.jar, Redirect::to("/account")).into_response();
    }
    let l = portal.layout(&visit);
    page(visit, StatusCode::OK, HomePage { l })
}

#[derive(Template)]
#[template(path = "portal/register.html")]
struct RegisterPage {
    l: Layout,
    username: String,
    email: String,
    full_name: String,
    username_error: Option<String>,
    email_error: Option<String>,
    full_name_error: Option<String>,
    problem: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RegisterForm {
    csrf: String,
    username: String,
    email: String,
    full_name: String,
}

async fn register_form(State(portal): State<Portal>, jar: CookieJar) -> Response {
    let visit = portal.visit(jar).await;
    let l = portal.layout(&visit);
    let body = RegisterPage {
        l,
        username: String::new(),
        email: String::new(),
        full_name: String::new(),
        username_error: None,
        email_error: None,
        full_name_error: None,
        problem: None,
    };
    page(visit, StatusCode::OK, body)
}

#[derive(Template)]
#[template(path = "portal/registered.html")]
struct RegisteredPage {
    l: Layout,
    username: String,
    secret: String,
    approved: bool,
}

async fn register(
    State(portal): State<Portal>,
    jar: CookieJar,
    Form(form): Form<RegisterForm>,
) -> Answer {
    let visit = portal.posted(jar, &form.csrf).await?;
    let request = Registration {
        username: form.username.trim().to_string(),
        email: form.email.trim().to_string(),
        full_name: form.full_name.clone(),
    };
    match portal.accounts.users.register(request).await {
        Ok((user, secret)) => {
            let l = portal.layout(&visit);
            let approved = user.status == Status::Approved;
            let body = RegisteredPage {
                l,
                username: user.username,
                secret,
                approved,
            };
            Ok(page(visit, StatusCode::CREATED, body))
        }
        Err(e) => {
            let status = crate::head::api::status_of(&e);
            let said = |field: &str| match e.field() == Some(field) {
                true => Some(reason_of(&e)),
                false => None,
            };
            let l = portal.layout(&visit);
            let body = RegisterPage {
                l,
                username: form.username,
                email: form.email,
                full_name: form.full_name,
                username_error: said("username"),
                email_error: said("email"),
                full_name_error: said("fullName"),
                problem: Some(match e.field() {
                    Some(_) => "Please correct the field marked below.".into(),
                    None => e.to_string(),
                }),
            };
            Ok(page(visit, status, body))
        }
    }
}

/// What is wrong with a field, worded to follow its label ("Username is already registered").
fn reason_of(e: &UserError) -> String {
    match e {
        UserError::Invalid { reason, .. } => reason.clone(),
        UserError::Duplicate { .. } => "is already registered".into(),
        other => other.to_string(),
    }
}

#[derive(Template)]
#[template(path = "portal/signin.html")]
struct SignInPage {
    l: Layout,
    username: String,
    problem: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SignInForm {
    csrf: String,
    username: String,
    secret: String,
}

async fn signin_form(State(portal): State<Portal>, jar: CookieJar) -> Response {
    let visit = portal.visit(jar).await;
    if visit.user.is_some() {
        return (visit.jar, Redirect::to("/account")).into_response();
    }
    let l = portal.layout(&visit);
    let body = SignInPage {
        l,
        username: String::new(),
        problem: None,
    };
    page(visit, StatusCode::OK, body)
}

async fn signin(
    State(portal): State<Portal>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    jar: CookieJar,
    Form(form): Form<SignInForm>,
) -> Answer {
    let visit = portal.posted(jar, &form.csrf).await?;
    let username = form.username.trim().to_string();
    // Per name from this address (nobody locks a user out from elsewhere), and per address;
    // a name that cannot be a username is counted as one.
    let name = match crate::input::check_label(&username) {
        Ok(()) => username.as_str(),
        Err(_) => "?",
    };
    let (by_user, by_address) = (
        format!("user:{name}@{}", from.ip()),
        format!("addr:{}", from.ip()),
    );
    let limited = portal.limiter.attempt(&[
        (&by_user, session::PER_USER),
        (&by_address, session::PER_ADDRESS),
    ]);
    let refused = |problem: String, status: StatusCode| {
        let l = portal.layout(&visit);
        (l, problem, status)
    };
    let (l, problem, status) = match limited {
        Err(wait) => {
            let minutes = wait.as_secs().div_ceil(60);
            refused(
                format!("Too many sign-in attempts. Try again in {minutes} minutes."),
                StatusCode::TOO_MANY_REQUESTS,
            )
        }
        Ok(()) => match portal
            .accounts
            .users
            .authenticate(&username, &form.secret)
            .await
        {
            Ok(user) => {
                portal.limiter.clear(&[&by_user]);
                let cookie = portal.keys.issue(&user.username, &user.uid, now_ms());
                let lifetime = Some(portal.keys.lifetime);
                let jar = visit
                    .jar
                    .add(secure_cookie(SESSION_COOKIE, cookie, lifetime));
                info!(user = %user.username, "signed in to the portal");
                return Ok((jar, Redirect::to("/account")).into_response());
            }
            Err(UserError::Unauthorized) => refused(
                "The username or the sign-in secret is wrong.".into(),
                StatusCode::UNAUTHORIZED,
            ),
            Err(e) => {
                warn!(error = %e, "cannot check a sign-in");
                refused(
                    "Signing in is not possible right now; try again in a moment.".into(),
                    crate::head::api::status_of(&e),
                )
            }
        },
    };
    let body = SignInPage {
        l,
        username: crate::input::clip(&username),
        problem: Some(problem),
    };
    Ok(page(visit, status, body))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenForm {
    csrf: String,
}

async fn signout(
    State(portal): State<Portal>,
    jar: CookieJar,
    Form(form): Form<TokenForm>,
) -> Answer {
    let visit = portal.posted(jar, &form.csrf).await?;
    if let Some(user) = &visit.user
        && let Err(e) = portal.accounts.users.sign_out(&user.username).await
    {
        let text = format!("Signing out failed: {e}. Try again.");
        let status = crate::head::api::status_of(&e);
        return Ok(message(&portal, visit, status, "Sign out", text));
    }
    let jar = visit.jar.add(gone(SESSION_COOKIE));
    Ok((jar, Redirect::to("/signin")).into_response())
}

#[derive(Template)]
#[template(path = "portal/account.html")]
struct AccountPage {
    l: Layout,
    problem: Option<String>,
    status: String,
    status_says: String,
    aup_says: String,
    aup_action: bool,
    aup_version: i64,
    kubeconfig_ready: bool,
    kubeconfig_says: String,
    namespace: String,
    file: String,
}

/// A date for people: `2027-06-01 12:00 UTC`.
fn day(rfc3339: Option<&str>) -> String {
    rfc3339
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "an unknown date".into())
}

impl Portal {
    async fn account_page(
        &self,
        visit: Visit,
        user: User,
        status: StatusCode,
        problem: Option<String>,
    ) -> Response {
        let current = match self.accounts.users.aup().await {
            Ok(aup) => aup.version,
            Err(e) => {
                let text = format!("The policy cannot be read now: {e}");
                return message(self, visit, StatusCode::BAD_GATEWAY, "Your account", text);
            }
        };
        let contact = match &self.contact {
            Some(c) => format!(" Questions? Write to {c}."),
            None => String::new(),
        };
        let status_says = match user.status {
            Status::Pending => format!(
                "Your registration waits for an administrator's approval. Come back later: \
                 once it is approved and you have accepted the Acceptable Use Policy, you can \
                 download your kubeconfig here.{contact}"
            ),
            Status::Approved => "Your registration is approved.".into(),
            Status::Rejected => format!(
                "An administrator rejected your registration, so you cannot get access.{contact}"
            ),
            Status::Revoked => format!(
                "An administrator revoked your access; kubeconfigs you downloaded no longer \
                 work.{contact}"
            ),
        };
        let expires = user
            .aup
            .expires_at
            .as_deref()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
        let soon = expires.is_some_and(|t| {
            let left = t.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
            left < RENEW_BEFORE.as_secs() as i64
        });
        let refused = matches!(user.status, Status::Rejected | Status::Revoked);
        let (aup_says, aup_action) = match (user.aup.valid, user.aup.version) {
            (true, _) if soon => (
                format!(
                    "You accepted version {current}; your acceptance expires on {}. Renew it \
                     now to keep your access.",
                    day(user.aup.expires_at.as_deref())
                ),
                true,
            ),
            (true, _) => (
                format!(
                    "You accepted version {current}; your acceptance is valid until {}.",
                    day(user.aup.expires_at.as_deref())
                ),
                false,
            ),
            (false, Some(v)) if v != current => (
                format!(
                    "A new version ({current}) was published since you accepted version {v}: \
                     accept it to keep your access."
                ),
                !refused,
            ),
            (false, Some(_)) => (
                format!(
                    "Your acceptance expired on {}: accept the policy again.",
                    day(user.aup.expires_at.as_deref())
                ),
                !refused,
            ),
            (false, None) => (
                "You have not accepted it yet: you need to before you can have a kubeconfig."
                    .into(),
                !refused,
            ),
        };
        let kubeconfig_says = match (user.status, user.aup.valid) {
            (Status::Approved, true) if self.accounts.access.is_none() => {
                "This head runs without a Kubernetes cluster, so it hands out no kubeconfigs."
                    .into()
            }
            (Status::Approved, true) => String::new(),
            (Status::Pending, _) => {
                "Available once an administrator approves your registration.".into()
            }
            (Status::Approved, false) => {
                "Available once you accept the current Acceptable Use Policy.".into()
            }
            (Status::Rejected | Status::Revoked, _) => {
                "Not available: your registration is not approved.".into()
            }
        };
        let l = self.layout(&visit);
        let body = AccountPage {
            l,
            problem,
            status: user.status.as_str().into(),
            status_says,
            aup_says,
            aup_action,
            aup_version: current,
            kubeconfig_ready: kubeconfig_says.is_empty(),
            kubeconfig_says,
            namespace: user.username.clone(),
            file: format!("{}-kubeconfig.yaml", user.username),
        };
        page(visit, status, body)
    }
}

async fn account(State(portal): State<Portal>, jar: CookieJar) -> Answer {
    let (user, visit) = signed_in(portal.visit(jar).await)?;
    Ok(portal.account_page(visit, user, StatusCode::OK, None).await)
}

#[derive(Template)]
#[template(path = "portal/aup.html")]
struct AupPage {
    l: Layout,
    version: i64,
    text: String,
    standing: Option<String>,
    problem: Option<String>,
}

impl Portal {
    async fn aup_page(
        &self,
        visit: Visit,
        status: StatusCode,
        problem: Option<String>,
    ) -> Response {
        let aup = match self.accounts.users.aup().await {
            Ok(aup) => aup,
            Err(e) => {
                let text = format!("The policy cannot be read now: {e}");
                return message(self, visit, StatusCode::BAD_GATEWAY, "Policy", text);
            }
        };
        let standing = visit.user.as_ref().and_then(|u| match u.aup.valid {
            true => Some(format!(
                "You accepted this version; your acceptance is valid until {}. Accepting it \
                 again renews it.",
                day(u.aup.expires_at.as_deref())
            )),
            false => None,
        });
        let l = self.layout(&visit);
        let body = AupPage {
            l,
            version: aup.version,
            text: aup.text,
            standing,
            problem,
        };
        page(visit, status, body)
    }
}

async fn aup_page(State(portal): State<Portal>, jar: CookieJar) -> Response {
    let visit = portal.visit(jar).await;
    portal.aup_page(visit, StatusCode::OK, None).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AcceptForm {
    csrf: String,
    version: String,
    accept: String,
}

async fn accept(
    State(portal): State<Portal>,
    jar: CookieJar,
    Form(form): Form<AcceptForm>,
) -> Answer {
    let visit = portal.posted(jar, &form.csrf).await?;
    let (user, visit) = signed_in(visit)?;
    if form.accept != "yes" {
        let problem = "Tick the box to accept the policy.".to_string();
        return Ok(portal
            .aup_page(visit, StatusCode::UNPROCESSABLE_ENTITY, Some(problem))
            .await);
    }
    let version = form.version.parse::<i64>().unwrap_or(-1);
    match portal.accounts.users.accept(&user.username, version).await {
        Ok(_) => Ok((visit.jar, Redirect::to("/account")).into_response()),
        Err(UserError::Invalid { field, .. }) if field == "version" => {
            let problem = "A new version of the policy was published meanwhile: read it \
                           below and accept it."
                .to_string();
            Ok(portal
                .aup_page(visit, StatusCode::CONFLICT, Some(problem))
                .await)
        }
        Err(e) => {
            let status = crate::head::api::status_of(&e);
            Ok(portal.aup_page(visit, status, Some(e.to_string())).await)
        }
    }
}

async fn kubeconfig(
    State(portal): State<Portal>,
    jar: CookieJar,
    Form(form): Form<TokenForm>,
) -> Answer {
    let visit = portal.posted(jar, &form.csrf).await?;
    let (user, visit) = signed_in(visit)?;
    match portal.accounts.kubeconfig(&user).await {
        Ok(kubeconfig) => {
            info!(user = %user.username, "kubeconfig issued through the portal");
            let disposition = format!("attachment; filename=\"{}-kubeconfig.yaml\"", user.username);
            let mut response = (
                visit.jar,
                [(header::CONTENT_TYPE, "application/yaml")],
                kubeconfig,
            )
                .into_response();
            if let Ok(value) = HeaderValue::from_str(&disposition) {
                response
                    .headers_mut()
                    .insert(header::CONTENT_DISPOSITION, value);
            }
            Ok(response)
        }
        Err(e) => {
            let status = crate::head::api::status_of(&e);
            let problem = match &e {
                UserError::Forbidden(_) => {
                    "You cannot have a kubeconfig now; this page says why.".to_string()
                }
                other => format!("No kubeconfig: {other}"),
            };
            Ok(portal
                .account_page(visit, user, status, Some(problem))
                .await)
        }
    }
}
