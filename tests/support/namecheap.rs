//! A Namecheap XML API emulator for tests: real HTTP/1.1 on 127.0.0.1, all state in memory, one
//! zone per registered domain, so a DNS client built on `namecheap.domains.dns.getHosts` and
//! `namecheap.domains.dns.setHosts` runs against it unmodified.
//!
//! [`Namecheap::start`] serves `GET` and `POST` on `/xml.response` ([`Namecheap::url`]).
//! Parameters come from the query string and, for `application/x-www-form-urlencoded` bodies,
//! from the body; names are case-insensitive, as on the real service. Every request must carry
//! `ApiUser`, `ApiKey`, `UserName`, `ClientIp` and `Command` matching the fixed credentials of
//! [`Namecheap::api_user`], [`Namecheap::api_key`], [`Namecheap::username`] and
//! [`Namecheap::client_ip`]. Answers are Namecheap's XML envelope (`ApiResponse`, `Errors`,
//! `Warnings`, `RequestedCommand`, `CommandResponse`, `Server`, `GMTTimeDifference`,
//! `ExecutionTime`) with HTTP 200, errors included.
//!
//! `setHosts` replaces the zone's whole host list with exactly the hosts sent (numbered
//! `HostNameN`, `RecordTypeN`, `AddressN`, optional `TTLN` (default 1800, 60..=60000) and
//! `MXPrefN` (default 10)), and optionally `EmailType`. As on the real service, CNAME and MX
//! addresses are stored and answered with a trailing dot (`target.example.com.`), and every
//! `setHosts` gives every host a fresh `HostId`.
//!
//! Error numbers used (the first group is documented by Namecheap; the rest follow its
//! numbering pattern, the exact numbers for these cases being undocumented):
//! 1010101 ApiUser missing, 1010102 ApiKey missing, 1010104 Command missing, 1010105 ClientIp
//! missing, 1011102 wrong ApiUser or ApiKey ("API Key is invalid or API access has not been
//! enabled"), 1011105 ClientIp not an IPv4 address, 1011150 ClientIp not whitelisted ("Invalid
//! request IP: …"), 1016103 UserName not the API user's, 2019166 domain not found, 2030166
//! invalid host record field (unknown RecordType, TTL or MXPref out of range, bad EmailType),
//! 2050900 "Invalid Address" (A/AAAA not an IP address), 5050900 "Unknown exceptions" (the
//! transient [`Fault::ApiError`]); inferred: 1010103 UserName missing, 1011104 unknown Command,
//! 2011166 SLD/TLD or a required host field missing.
//!
//! Deliberate simplifications: one account that owns every zone (so 2016166 "not associated with
//! your account" never occurs); no rate limiting; `IsUsingOurDNS` is always true; only A and AAAA
//! addresses are checked; a `setHosts` without `EmailType` keeps the zone's email type; other
//! commands are unknown.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

const API_USER: &str = "edgesync";
const API_KEY: &str = "3f7c1e9a52d84b06a1c2e5f8d9b04a7e";
/// The whitelisted client address (TEST-NET-3, never a real host).
const CLIENT_IP: &str = "203.0.113.7";
const NAMESPACE: &str = "http://api.namecheap.com/xml.response";
const GET_HOSTS: &str = "namecheap.domains.dns.getHosts";
const SET_HOSTS: &str = "namecheap.domains.dns.setHosts";
/// Record types `setHosts` accepts.
const KINDS: [&str; 12] = [
    "A", "AAAA", "CNAME", "MX", "TXT", "NS", "URL", "URL301", "FRAME", "CAA", "MXE", "ALIAS",
];
/// Record types whose address the service answers with a trailing dot.
const DOTTED: [&str; 2] = ["CNAME", "MX"];
const EMAIL_TYPES: [&str; 5] = ["MXE", "MX", "FWD", "OX", "NONE"];
const DEFAULT_TTL: u32 = 1800;
const DEFAULT_MX_PREF: u32 = 10;
const MAX_BODY: usize = 1024 * 1024;
/// How long a [`Fault::Timeout`] holds its request.
const HOLD: Duration = Duration::from_secs(30);
/// Default service time of each request, long enough for concurrent requests to overlap.
const DEFAULT_LATENCY: Duration = Duration::from_millis(20);

/// One host record of a zone, as `getHosts` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Host name relative to the domain: `@`, `www`, `_acme-challenge.api`.
    pub name: String,
    /// Record type: A, AAAA, CNAME, MX, TXT, NS, URL, URL301, FRAME, CAA, MXE or ALIAS.
    pub kind: String,
    /// IP address, target host name, URL or text, depending on the type.
    pub address: String,
    /// Time to live in seconds.
    pub ttl: u32,
    /// MX preference (reported for every type; meaningful for MX only).
    pub mx_pref: u32,
}

impl Record {
    /// A record with the default TTL (1800) and MX preference (10).
    pub fn new(name: &str, kind: &str, address: &str) -> Record {
        Record {
            name: name.to_string(),
            kind: kind.to_string(),
            address: address.to_string(),
            ttl: DEFAULT_TTL,
            mx_pref: DEFAULT_MX_PREF,
        }
    }

    /// The record as the service stores it: type upper-cased, CNAME/MX targets dotted.
    fn normalised(mut self) -> Record {
        self.kind = self.kind.to_ascii_uppercase();
        if DOTTED.contains(&self.kind.as_str()) && !self.address.ends_with('.') {
            self.address.push('.');
        }
        self
    }
}

/// A failure injected into the next requests with [`Namecheap::fail_next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 with an HTML error page; nothing is applied.
    Http500,
    /// HTTP 200, `Status="ERROR"`, error 5050900 "Unknown exceptions"; nothing is applied.
    ApiError,
    /// HTTP 200 with a body cut off mid-document: it starts like a success but is not XML.
    Garbage,
    /// Held for 30 s, then HTTP 504; nothing is applied.
    Timeout,
    /// A `getHosts` answered OK with no host elements; no effect on other commands.
    EmptyHosts,
}

/// One zone: its hosts with their HostIds, and the mail setting.
struct Zone {
    email_type: String,
    hosts: Vec<(u64, Record)>,
}

#[derive(Default)]
struct Store {
    zones: BTreeMap<String, Zone>,
    faults: VecDeque<Fault>,
    log: Vec<(String, BTreeMap<String, String>)>,
    next_host_id: u64,
    latency: Option<Duration>,
}

struct Shared {
    store: Mutex<Store>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    addr: SocketAddr,
}

impl Shared {
    /// Locks the state; a panic elsewhere while holding it does not matter here.
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a request in flight for as long as it lives (a dropped connection included).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running Namecheap API emulator on 127.0.0.1; dropping it stops the server.
pub struct Namecheap {
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Namecheap {
    /// Binds 127.0.0.1 on a free port and serves until dropped; no zones yet.
    pub async fn start() -> Namecheap {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local address of the emulator");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            addr,
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Namecheap {
            shared,
            shutdown: Some(tx),
        }
    }

    /// The API endpoint, `http://127.0.0.1:PORT/xml.response`.
    pub fn url(&self) -> String {
        format!("http://{}/xml.response", self.shared.addr)
    }

    /// The `ApiUser` every request must carry.
    pub fn api_user(&self) -> &'static str {
        API_USER
    }

    /// The `ApiKey` every request must carry.
    pub fn api_key(&self) -> &'static str {
        API_KEY
    }

    /// The `UserName` every request must carry (the same as the API user, as usual).
    pub fn username(&self) -> &'static str {
        API_USER
    }

    /// The whitelisted `ClientIp` every request must carry.
    pub fn client_ip(&self) -> &'static str {
        CLIENT_IP
    }

    /// Creates or replaces the zone of `domain` (`example.com`, `example.co.uk`) with `records`,
    /// stored as `setHosts` would store them. The email type is MX when there is an MX record,
    /// MXE when there is an MXE record, FWD otherwise.
    pub fn add_zone(&self, domain: &str, records: Vec<Record>) {
        let kinds: BTreeSet<String> = records
            .iter()
            .map(|r| r.kind.to_ascii_uppercase())
            .collect();
        let email_type = ["MX", "MXE"]
            .into_iter()
            .find(|k| kinds.contains(*k))
            .unwrap_or("FWD");
        let mut store = self.shared.lock();
        let hosts = store.number(records.into_iter().map(Record::normalised).collect());
        let zone = Zone {
            email_type: email_type.to_string(),
            hosts,
        };
        store.zones.insert(domain.to_ascii_lowercase(), zone);
    }

    /// The zone's current records, in order. Panics when there is no such zone.
    pub fn records(&self, domain: &str) -> Vec<Record> {
        let store = self.shared.lock();
        let zone = store
            .zones
            .get(&domain.to_ascii_lowercase())
            .unwrap_or_else(|| panic!("no zone {domain}: add_zone first"));
        zone.hosts.iter().map(|(_, r)| r.clone()).collect()
    }

    /// Makes the next `n` requests (after any already queued faults) fail with `kind`.
    pub fn fail_next(&self, n: usize, kind: Fault) {
        self.shared
            .lock()
            .faults
            .extend(std::iter::repeat_n(kind, n));
    }

    /// Every request received, in order: its `Command` as sent ("" when absent) and all of its
    /// parameters (query string and form body) with their names as sent.
    pub fn requests(&self) -> Vec<(String, BTreeMap<String, String>)> {
        self.shared.lock().log.clone()
    }

    /// The highest number of requests that were in flight at once.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Sets how long each request takes to serve (20 ms unless set), so that requests a client
    /// does not serialise overlap and show in [`Namecheap::max_concurrent`].
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = Some(latency);
    }
}

impl Drop for Namecheap {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let started = Instant::now();
    if !req.uri().path().eq_ignore_ascii_case("/xml.response") {
        return (StatusCode::NOT_FOUND, "404 - File or directory not found.").into_response();
    }
    if req.method() != Method::GET && req.method() != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let _in_flight = InFlight::enter(&shared);
    let mut params: BTreeMap<String, String> = parse_form(req.uri().query().unwrap_or_default());
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if req.method() == Method::POST && is_form {
        let Ok(body) = to_bytes(req.into_body(), MAX_BODY).await else {
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        };
        params.extend(parse_form(&String::from_utf8_lossy(&body)));
    }
    let lookup: BTreeMap<String, &str> = params
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    let command = lookup.get("command").copied().unwrap_or_default();
    let requested = command.to_ascii_lowercase();
    let (fault, latency) = {
        let mut store = shared.lock();
        store.log.push((command.to_string(), params.clone()));
        let fault = store.faults.pop_front();
        (fault, store.latency.unwrap_or(DEFAULT_LATENCY))
    };
    tokio::time::sleep(latency).await;
    let result = match fault {
        Some(Fault::Http500) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 - Internal server error.",
            );
        }
        Some(Fault::Timeout) => {
            tokio::time::sleep(HOLD).await;
            return html(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Time-out");
        }
        Some(Fault::Garbage) => {
            let cut = format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<ApiResponse Status=\"OK\" \
                 xmlns=\"{NAMESPACE}\">\r\n  <Errors />\r\n  <Warnings />\r\n  \
                 <RequestedCommand>{}</RequestedCommand>\r\n  <CommandRes",
                escape(&requested)
            );
            return xml(cut);
        }
        Some(Fault::ApiError) => Err(api_error(5050900, "Unknown exceptions")),
        Some(Fault::EmptyHosts) | None => {
            let empty = fault == Some(Fault::EmptyHosts);
            authenticate(&lookup).and_then(|()| shared.lock().execute(&requested, &lookup, empty))
        }
    };
    xml(envelope(&requested, result, started))
}

/// An `Error` element's number and text.
struct ApiError {
    number: u32,
    message: String,
}

fn api_error(number: u32, message: impl Into<String>) -> ApiError {
    ApiError {
        number,
        message: message.into(),
    }
}

/// Checks the global parameters, in the order the service reports them.
fn authenticate(p: &BTreeMap<String, &str>) -> Result<(), ApiError> {
    let required = [
        ("apiuser", 1010101, "Parameter APIUser is missing"),
        ("apikey", 1010102, "Parameter APIKey is missing"),
        ("command", 1010104, "Parameter Command is missing"),
        ("username", 1010103, "Parameter UserName is missing"),
        ("clientip", 1010105, "Parameter ClientIP is missing"),
    ];
    for (name, number, message) in required {
        if !p.contains_key(name) {
            return Err(api_error(number, message));
        }
    }
    if p["apiuser"] != API_USER || p["apikey"] != API_KEY {
        return Err(api_error(
            1011102,
            "API Key is invalid or API access has not been enabled",
        ));
    }
    let client_ip = p["clientip"];
    if client_ip.parse::<Ipv4Addr>().is_err() {
        return Err(api_error(1011105, "Parameter ClientIP is invalid"));
    }
    if client_ip != CLIENT_IP {
        return Err(api_error(
            1011150,
            format!("Invalid request IP: {client_ip}"),
        ));
    }
    if !p["username"].eq_ignore_ascii_case(API_USER) {
        return Err(api_error(1016103, "Parameter UserName is unauthorized"));
    }
    Ok(())
}

impl Store {
    /// Runs an authenticated command; the `CommandResponse` element on success.
    fn execute(
        &mut self,
        command: &str,
        p: &BTreeMap<String, &str>,
        empty_hosts: bool,
    ) -> Result<String, ApiError> {
        let (is_get, type_) = match command {
            c if c.eq_ignore_ascii_case(GET_HOSTS) => (true, GET_HOSTS),
            c if c.eq_ignore_ascii_case(SET_HOSTS) => (false, SET_HOSTS),
            _ => return Err(api_error(1011104, "Parameter Command is invalid")),
        };
        let part = |name: &str, label: &str| {
            let missing = || api_error(2011166, format!("Parameter {label} is missing"));
            p.get(name)
                .map(|v| v.trim().to_ascii_lowercase())
                .ok_or_else(missing)
        };
        let domain = format!("{}.{}", part("sld", "SLD")?, part("tld", "TLD")?);
        if !self.zones.contains_key(&domain) {
            return Err(api_error(2019166, "Domain not found"));
        }
        let inner = if is_get {
            let zone = &self.zones[&domain];
            let hosts = if empty_hosts {
                &[][..]
            } else {
                &zone.hosts[..]
            };
            let mut out = format!(
                "    <DomainDNSGetHostsResult Domain=\"{}\" EmailType=\"{}\" IsUsingOurDNS=\"true\">\r\n",
                escape(&domain),
                escape(&zone.email_type)
            );
            for (id, r) in hosts {
                out += &format!(
                    "      <host HostId=\"{id}\" Name=\"{}\" Type=\"{}\" Address=\"{}\" MXPref=\"{}\" \
                     TTL=\"{}\" AssociatedAppTitle=\"\" FriendlyName=\"\" IsActive=\"true\" \
                     IsDDNSEnabled=\"false\" />\r\n",
                    escape(&r.name),
                    escape(&r.kind),
                    escape(&r.address),
                    r.mx_pref,
                    r.ttl
                );
            }
            out + "    </DomainDNSGetHostsResult>\r\n"
        } else {
            let records = parse_hosts(p)?;
            let email_type = match p.get("emailtype") {
                Some(e) if EMAIL_TYPES.contains(&e.to_ascii_uppercase().as_str()) => {
                    Some(e.to_ascii_uppercase())
                }
                Some(e) => return Err(api_error(2030166, format!("Invalid EmailType: {e}"))),
                None => None,
            };
            let hosts = self.number(records);
            let zone = self.zones.get_mut(&domain).expect("zone checked above");
            zone.hosts = hosts;
            if let Some(e) = email_type {
                zone.email_type = e;
            }
            format!(
                "    <DomainDNSSetHostsResult Domain=\"{}\" IsSuccess=\"true\">\r\n      \
                 <Warnings />\r\n    </DomainDNSSetHostsResult>\r\n",
                escape(&domain)
            )
        };
        Ok(format!(
            "  <CommandResponse Type=\"{type_}\">\r\n{inner}  </CommandResponse>\r\n"
        ))
    }

    /// Gives each record a fresh HostId.
    fn number(&mut self, records: Vec<Record>) -> Vec<(u64, Record)> {
        records
            .into_iter()
            .map(|r| {
                self.next_host_id += 1;
                (self.next_host_id, r)
            })
            .collect()
    }
}

/// The numbered host fields of a `setHosts`, validated, in index order.
fn parse_hosts(p: &BTreeMap<String, &str>) -> Result<Vec<Record>, ApiError> {
    const FIELDS: [&str; 5] = ["hostname", "recordtype", "address", "ttl", "mxpref"];
    let indices: BTreeSet<u32> = p
        .keys()
        .filter_map(|k| FIELDS.iter().find_map(|f| k.strip_prefix(f)?.parse().ok()))
        .filter(|i| *i >= 1)
        .collect();
    let mut records = Vec::new();
    for i in indices {
        let field = |name: &str| p.get(&format!("{name}{i}")).copied();
        let required = |name: &str, label: &str| {
            let missing = || api_error(2011166, format!("Parameter {label}{i} is missing"));
            field(name).ok_or_else(missing)
        };
        let number =
            |name: &str, label: &str, default: u32, range: std::ops::RangeInclusive<u32>| {
                let Some(v) = field(name) else {
                    return Ok(default);
                };
                match v.trim().parse::<u32>() {
                    Ok(n) if range.contains(&n) => Ok(n),
                    _ => Err(api_error(2030166, format!("Invalid {label}{i}: {v}"))),
                }
            };
        let name = required("hostname", "HostName")?.to_string();
        let kind = required("recordtype", "RecordType")?.to_ascii_uppercase();
        if !KINDS.contains(&kind.as_str()) {
            return Err(api_error(2030166, format!("Invalid RecordType{i}: {kind}")));
        }
        let address = required("address", "Address")?.to_string();
        let bad_ip = match kind.as_str() {
            "A" => address.parse::<Ipv4Addr>().is_err(),
            "AAAA" => address.parse::<Ipv6Addr>().is_err(),
            _ => false,
        };
        if bad_ip {
            return Err(api_error(2050900, "Invalid Address"));
        }
        let ttl = number("ttl", "TTL", DEFAULT_TTL, 60..=60000)?;
        let mx_pref = number("mxpref", "MXPref", DEFAULT_MX_PREF, 0..=65535)?;
        let record = Record {
            name,
            kind,
            address,
            ttl,
            mx_pref,
        };
        records.push(record.normalised());
    }
    Ok(records)
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// The `ApiResponse` document around a command's result.
fn envelope(requested: &str, result: Result<String, ApiError>, started: Instant) -> String {
    let (status, errors, body) = match result {
        Ok(body) => ("OK", "  <Errors />\r\n".to_string(), body),
        Err(e) => {
            let errors = format!(
                "  <Errors>\r\n    <Error Number=\"{}\">{}</Error>\r\n  </Errors>\r\n",
                e.number,
                escape(&e.message)
            );
            ("ERROR", errors, String::new())
        }
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n\
         <ApiResponse Status=\"{status}\" xmlns=\"{NAMESPACE}\">\r\n{errors}  <Warnings />\r\n  \
         <RequestedCommand>{}</RequestedCommand>\r\n{body}  <Server>PHX01APIEXT01</Server>\r\n  \
         <GMTTimeDifference>--4:00</GMTTimeDifference>\r\n  \
         <ExecutionTime>{:.3}</ExecutionTime>\r\n</ApiResponse>",
        escape(requested),
        started.elapsed().as_secs_f64()
    )
}

fn xml(body: String) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/xml; charset=utf-8")];
    (StatusCode::OK, content_type, body).into_response()
}

fn html(status: StatusCode, title: &str) -> Response {
    let body =
        format!("<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>");
    (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
}

/// Escapes text for XML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` pairs; a later duplicate wins.
fn parse_form(s: &str) -> BTreeMap<String, String> {
    s.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digit = |j: usize| Some((*bytes.get(j)? as char).to_digit(16)? as u8);
        let hex = digit(i + 1).zip(digit(i + 2)).map(|(h, l)| h << 4 | l);
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const DOMAIN: [(&str, &str); 2] = [("SLD", "example"), ("TLD", "com")];

    /// Runs a test body with an overall deadline.
    async fn within(body: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(20), body)
            .await
            .expect("test exceeded its time limit");
    }

    /// Sends one request on a fresh connection, `form` as the body; the status and the body.
    async fn send(
        nc: &Namecheap,
        method: Method,
        target: &str,
        form: &[(&str, &str)],
    ) -> (u16, String) {
        let stream = tokio::net::TcpStream::connect(nc.shared.addr)
            .await
            .unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, nc.shared.addr.to_string())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(axum::body::Bytes::from(encode(
                form,
            ))))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn encode(form: &[(&str, &str)]) -> String {
        let enc = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                        (b as char).to_string()
                    }
                    b' ' => "+".to_string(),
                    b => format!("%{b:02X}"),
                })
                .collect()
        };
        let pairs: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect();
        pairs.join("&")
    }

    /// The global parameters with the right credentials.
    fn credentials<'a>(nc: &'a Namecheap, command: &'a str) -> Vec<(&'a str, &'a str)> {
        let p = [
            ("ApiUser", nc.api_user()),
            ("ApiKey", nc.api_key()),
            ("UserName", nc.username()),
        ];
        [
            &p[..],
            &[("ClientIp", nc.client_ip()), ("Command", command)],
        ]
        .concat()
    }

    /// POSTs a form with the right credentials plus `extra`.
    async fn call(nc: &Namecheap, command: &str, extra: &[(&str, &str)]) -> (u16, String) {
        let form = [credentials(nc, command), extra.to_vec()].concat();
        send(nc, Method::POST, "/xml.response", &form).await
    }

    fn error_number(body: &str) -> &str {
        let at = body.find("<Error Number=\"").expect("an error") + 15;
        &body[at..at + 7]
    }

    #[tokio::test]
    async fn get_hosts_then_set_hosts_replaces_the_whole_list() {
        within(async {
            let nc = Namecheap::start().await;
            let mx = Record {
                mx_pref: 5,
                ..Record::new("@", "MX", "mx.example.net")
            };
            nc.add_zone("example.com", vec![Record::new("@", "A", "1.2.3.4"), mx]);

            let query = [
                credentials(&nc, GET_HOSTS),
                vec![("SLD", "Example"), ("TLD", "com")],
            ]
            .concat();
            let target = format!("/xml.response?{}", encode(&query));
            let (status, body) = send(&nc, Method::GET, &target, &[]).await;
            assert_eq!(status, 200);
            assert!(body.contains("<ApiResponse Status=\"OK\""), "{body}");
            assert!(
                body.contains(
                    "<RequestedCommand>namecheap.domains.dns.gethosts</RequestedCommand>"
                )
            );
            assert!(
                body.contains("Domain=\"example.com\" EmailType=\"MX\""),
                "{body}"
            );
            assert!(
                body.contains(
                    "Name=\"@\" Type=\"A\" Address=\"1.2.3.4\" MXPref=\"10\" TTL=\"1800\""
                )
            );
            assert!(
                body.contains("Type=\"MX\" Address=\"mx.example.net.\" MXPref=\"5\""),
                "{body}"
            );

            let txt = "v=spf1 \"quoted\" <&>";
            let hosts = [
                ("HostName1", "www"),
                ("RecordType1", "cname"),
                ("Address1", "example.com"),
                ("HostName2", "@"),
                ("RecordType2", "TXT"),
                ("Address2", txt),
                ("TTL2", "300"),
            ];
            let (status, body) = call(&nc, SET_HOSTS, &[&DOMAIN[..], &hosts].concat()).await;
            assert_eq!(status, 200);
            assert!(
                body.contains(
                    "<DomainDNSSetHostsResult Domain=\"example.com\" IsSuccess=\"true\">"
                )
            );
            let want_txt = Record {
                ttl: 300,
                ..Record::new("@", "TXT", txt)
            };
            let want = vec![Record::new("www", "CNAME", "example.com."), want_txt];
            assert_eq!(nc.records("example.com"), want, "MX gone, CNAME dotted");

            let (_, body) = call(&nc, GET_HOSTS, &DOMAIN).await;
            assert_eq!(body.matches("<host ").count(), 2, "{body}");
            assert!(
                body.contains("Address=\"v=spf1 &quot;quoted&quot; &lt;&amp;&gt;\""),
                "{body}"
            );
            let log = nc.requests();
            let commands: Vec<&str> = log.iter().map(|(c, _)| c.as_str()).collect();
            assert_eq!(commands, [GET_HOSTS, SET_HOSTS, GET_HOSTS]);
            assert_eq!(log[1].1["Address2"], txt);
        })
        .await;
    }

    #[tokio::test]
    async fn bad_requests_get_namecheap_errors_with_http_200_and_change_nothing() {
        within(async {
            let nc = Namecheap::start().await;
            nc.add_zone("example.com", vec![Record::new("@", "A", "1.2.3.4")]);
            let before = nc.records("example.com");
            let host = |kind: &'static str, address: &'static str, ttl: &'static str| {
                let fields = [
                    ("HostName1", "@"),
                    ("RecordType1", kind),
                    ("Address1", address),
                    ("TTL1", ttl),
                ];
                [&DOMAIN[..], &fields].concat()
            };
            let cases = [
                (GET_HOSTS, vec![("SLD", "other"), ("TLD", "com")], "2019166"),
                (GET_HOSTS, vec![("TLD", "com")], "2011166"),
                ("namecheap.domains.getList", DOMAIN.to_vec(), "1011104"),
                (SET_HOSTS, host("SPF", "x", "1800"), "2030166"),
                (SET_HOSTS, host("A", "1.2.3.4", "59"), "2030166"),
                (SET_HOSTS, host("A", "1.2.3.4", "60001"), "2030166"),
                (SET_HOSTS, host("A", "not-an-ip", "1800"), "2050900"),
                (
                    SET_HOSTS,
                    [&DOMAIN[..], &[("HostName1", "@")]].concat(),
                    "2011166",
                ),
            ];
            for (command, params, number) in cases {
                let (status, body) = call(&nc, command, &params).await;
                assert_eq!(status, 200);
                assert!(body.contains("<ApiResponse Status=\"ERROR\""), "{body}");
                assert_eq!(error_number(&body), number, "{command} {params:?}: {body}");
            }

            let form = |key: &'static str, value: &'static str| {
                let mut p = credentials(&nc, GET_HOSTS);
                p.retain(|(k, _)| *k != key);
                if !value.is_empty() {
                    p.push((key, value));
                }
                [p, DOMAIN.to_vec()].concat()
            };
            let auth = [
                (form("ApiUser", ""), "1010101"),
                (form("ApiKey", "wrong"), "1011102"),
                (form("ClientIp", "198.51.100.1"), "1011150"),
                (form("ClientIp", "nonsense"), "1011105"),
                (form("UserName", "someone"), "1016103"),
                (form("Command", ""), "1010104"),
            ];
            for (params, number) in auth {
                let (status, body) = send(&nc, Method::POST, "/xml.response", &params).await;
                assert_eq!(status, 200);
                assert_eq!(error_number(&body), number, "{params:?}: {body}");
            }
            let (_, body) = send(
                &nc,
                Method::POST,
                "/xml.response",
                &form("ClientIp", "198.51.100.1"),
            )
            .await;
            assert!(
                body.contains(">Invalid request IP: 198.51.100.1</Error>"),
                "{body}"
            );
            assert_eq!(nc.records("example.com"), before);
        })
        .await;
    }

    #[tokio::test]
    async fn faults_apply_to_the_next_requests_in_order() {
        within(async {
            let nc = Namecheap::start().await;
            nc.add_zone("example.com", vec![Record::new("@", "A", "1.2.3.4")]);
            nc.fail_next(1, Fault::Http500);
            nc.fail_next(1, Fault::ApiError);
            nc.fail_next(1, Fault::Garbage);
            nc.fail_next(1, Fault::EmptyHosts);
            let (status, _) = call(&nc, GET_HOSTS, &DOMAIN).await;
            assert_eq!(status, 500);
            let (_, body) = call(&nc, GET_HOSTS, &DOMAIN).await;
            assert_eq!(error_number(&body), "5050900");
            let (status, body) = call(&nc, GET_HOSTS, &DOMAIN).await;
            assert_eq!(status, 200);
            assert!(!body.contains("</ApiResponse>"), "{body}");
            let (_, body) = call(&nc, GET_HOSTS, &DOMAIN).await;
            assert!(
                body.contains("Status=\"OK\"") && !body.contains("<host "),
                "{body}"
            );
            let (_, body) = call(&nc, GET_HOSTS, &DOMAIN).await;
            assert_eq!(body.matches("<host ").count(), 1, "{body}");

            nc.fail_next(1, Fault::Timeout);
            let held = call(&nc, SET_HOSTS, &DOMAIN);
            let gave_up = tokio::time::timeout(Duration::from_millis(300), held).await;
            assert!(gave_up.is_err(), "a Timeout fault holds the request");
            assert_eq!(nc.requests().len(), 6);
            assert_eq!(nc.records("example.com").len(), 1, "nothing applied");
        })
        .await;
    }

    #[tokio::test]
    async fn max_concurrent_tells_overlapping_requests_from_serialised_ones() {
        within(async {
            let nc = Namecheap::start().await;
            nc.add_zone("example.com", Vec::new());
            nc.set_latency(Duration::from_millis(100));
            for _ in 0..3 {
                call(&nc, GET_HOSTS, &DOMAIN).await;
            }
            assert_eq!(nc.max_concurrent(), 1);
            let calls = (0..3).map(|_| call(&nc, GET_HOSTS, &DOMAIN));
            futures_util::future::join_all(calls).await;
            assert_eq!(nc.max_concurrent(), 3);
        })
        .await;
    }
}
