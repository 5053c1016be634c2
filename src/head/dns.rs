//! DNS records for edge workers: `<node>.<zone>` (A or AAAA) follows the address each edge is
//! reachable at, and goes when the node is removed. One task on the writer head (or a
//! standalone head) makes the changes one at a time, retries what failed with backoff, and
//! records what it published in the heads' registry.
//!
//! Providers: `none` logs what it would do; `namecheap` uses the XML API, whose `setHosts`
//! replaces the whole host list: so every change reads the list, changes only our record, and
//! writes every other record back exactly as it was, and never writes after a failed or
//! unparsable read.

use crate::config::dns::{DnsConfig, ProviderConfig};
use crate::head::edges::Edges;
use crate::registry::Registry;
use crate::transport::Backoff;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a refused change waits before it is tried again.
const REFUSED_RETRY: Duration = Duration::from_secs(600);
/// How long a registry change may wait for others to be handled with it.
const SETTLE: Duration = Duration::from_millis(200);
/// Longest wait for one provider request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Worth trying again later (network, server, unreadable answer).
    #[error("{0}")]
    Transient(String),
    /// The zone holds something that is not ours under the name or address.
    #[error("{0}")]
    Refused(String),
}

/// One record as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Host name relative to the domain (`@` for the apex).
    pub name: String,
    /// Record type.
    pub kind: String,
    /// Address or target.
    pub address: String,
    /// TTL.
    pub ttl: String,
    /// MX preference.
    pub mx_pref: String,
}

/// What the head wants the record of `node` to be (None: no record).
fn desired(registry: &Registry) -> BTreeMap<String, Option<IpAddr>> {
    let mut want: BTreeMap<String, Option<IpAddr>> = BTreeMap::new();
    for (name, registration) in &registry.nodes {
        let address = registry.addresses.get(name).copied();
        want.insert(name.clone(), address.filter(|_| !registration.removed));
    }
    for name in registry.dns.keys() {
        want.entry(name.clone()).or_insert(None);
    }
    want
}

fn record_type(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "A",
        IpAddr::V6(_) => "AAAA",
    }
}

/// Keeps the records equal to what the registry says, while `leading` (always on a standalone
/// head).
pub async fn run(
    edges: Edges,
    config: DnsConfig,
    mut leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let provider = Provider::new(&config);
    // What was published is known only once the cluster's state is read.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = edges.ready() => {}
    }
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    // Refused changes, with when; tried again after REFUSED_RETRY in case the zone changed.
    let mut refused: BTreeMap<String, (Option<IpAddr>, Instant)> = BTreeMap::new();
    // One deadline kept across wake-ups, so other traffic cannot put a retry off.
    let mut retry_at: Option<Instant> = Some(Instant::now());
    // A standalone head has no election: its sender is gone and it always leads.
    let mut elected = true;
    // How long reading every edge took last time: a burst waits ten times that, so that with
    // tens of thousands of edges, whose presence moves all the time, reading them takes at
    // most about a tenth of a core.
    let mut reading = Duration::ZERO;
    loop {
        let wait = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = leading.changed(), if elected => elected = changed.is_ok(),
            _ = wait => {}
            // Changes come in bursts (many edges connect at once): each pass reads every
            // edge, so one pass follows a burst.
            _ = edges.changed() => {
                let soon = Instant::now() + SETTLE.max(reading * 10);
                retry_at = Some(retry_at.map_or(soon, |at| at.min(soon)));
                continue;
            }
        }
        if !*leading.borrow() {
            retry_at = None;
            continue;
        }
        refused.retain(|_, (_, at)| at.elapsed() < REFUSED_RETRY);
        let read = Instant::now();
        let registry = edges.dns_view().await;
        let desired = desired(&registry);
        reading = read.elapsed();
        let mut failed = false;
        for (name, want) in desired {
            let have = registry.dns.get(&name).copied();
            if have == want || refused.get(&name).is_some_and(|(r, _)| *r == want) {
                continue;
            }
            let fqdn = format!("{name}.{}", config.zone);
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = provider.set(&config, &name, want, have) => result,
            };
            match result {
                Ok(()) => {
                    match want {
                        Some(ip) => {
                            info!(record = %fqdn, kind = record_type(ip), address = %ip, "DNS record set")
                        }
                        None => info!(record = %fqdn, "DNS record removed"),
                    }
                    refused.remove(&name);
                    if let Err(e) = edges.set_published(&name, want).await {
                        warn!(record = %fqdn, error = %e, "cannot record the published DNS record");
                    }
                }
                Err(DnsError::Refused(reason)) => {
                    warn!(record = %fqdn, %reason, "DNS record not set");
                    refused.insert(name, (want, Instant::now()));
                }
                Err(DnsError::Transient(reason)) => {
                    warn!(record = %fqdn, %reason, "DNS update failed; will retry");
                    failed = true;
                    break;
                }
            }
        }
        retry_at = if failed {
            Some(Instant::now() + backoff.next_delay())
        } else {
            backoff.reset();
            refused.values().map(|(_, at)| *at + REFUSED_RETRY).min()
        };
    }
}

/// A DNS provider.
enum Provider {
    None,
    Namecheap(Namecheap),
}

impl Provider {
    fn new(config: &DnsConfig) -> Provider {
        match &config.provider {
            ProviderConfig::None => Provider::None,
            ProviderConfig::Namecheap { .. } => Provider::Namecheap(Namecheap {
                // reqwest is built without a bundled crypto provider: use ring, as rustls does
                // everywhere else here (a no-op when already installed).
                http: {
                    let _ = rustls::crypto::ring::default_provider().install_default();
                    reqwest::Client::builder()
                        .timeout(REQUEST_TIMEOUT)
                        .build()
                        .unwrap_or_default()
                },
            }),
        }
    }

    /// Makes `<node>.<zone>` hold `want`; `have` is what we published before.
    async fn set(
        &self,
        config: &DnsConfig,
        node: &str,
        want: Option<IpAddr>,
        have: Option<IpAddr>,
    ) -> Result<(), DnsError> {
        match self {
            Provider::None => {
                let fqdn = format!("{node}.{}", config.zone);
                match want {
                    Some(ip) => {
                        info!(record = %fqdn, kind = record_type(ip), address = %ip, ttl = config.ttl, "DNS provider none: would set")
                    }
                    None => info!(record = %fqdn, "DNS provider none: would remove"),
                }
                Ok(())
            }
            Provider::Namecheap(n) => n.set(config, node, want, have).await,
        }
    }
}

struct Namecheap {
    http: reqwest::Client,
}

/// The changed host list: ours replaced, every other record as it was.
pub fn change_hosts(
    hosts: &[Host],
    node: &str,
    want: Option<IpAddr>,
    have: Option<IpAddr>,
    ttl: u32,
) -> Result<Vec<Host>, DnsError> {
    // Ours: what we published, or already what we want (a write whose answer was lost).
    let ours = |h: &Host| {
        h.name.eq_ignore_ascii_case(node)
            && (h.kind == "A" || h.kind == "AAAA")
            && [have, want]
                .into_iter()
                .flatten()
                .any(|ip| h.address.parse() == Ok(ip))
    };
    if let Some(other) = hosts
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(node) && !ours(h))
    {
        return Err(DnsError::Refused(format!(
            "the name {node} is already used by another record ({} {})",
            other.kind, other.address
        )));
    }
    if let Some(ip) = want
        && let Some(other) = hosts
            .iter()
            .find(|h| !h.name.eq_ignore_ascii_case(node) && h.address.parse::<IpAddr>() == Ok(ip))
    {
        return Err(DnsError::Refused(format!(
            "the address {ip} is already used by another record ({} {})",
            other.kind, other.name
        )));
    }
    let mut changed: Vec<Host> = hosts.iter().filter(|h| !ours(h)).cloned().collect();
    if let Some(ip) = want {
        changed.push(Host {
            name: node.to_string(),
            kind: record_type(ip).to_string(),
            address: ip.to_string(),
            ttl: ttl.to_string(),
            mx_pref: "10".into(),
        });
    }
    Ok(changed)
}

impl Namecheap {
    async fn set(
        &self,
        config: &DnsConfig,
        node: &str,
        want: Option<IpAddr>,
        have: Option<IpAddr>,
    ) -> Result<(), DnsError> {
        let ProviderConfig::Namecheap {
            api_url,
            api_user,
            api_key,
            username,
            client_ip,
            domain,
        } = &config.provider
        else {
            return Ok(());
        };
        // Host names are relative to the registered domain.
        let host = match config.zone.strip_suffix(&format!(".{domain}")) {
            Some(below) => format!("{node}.{below}"),
            None => node.to_string(),
        };
        let (sld, tld) = domain.split_once('.').unwrap_or((domain, ""));
        let mut params: Vec<(String, String)> = vec![
            ("ApiUser".into(), api_user.clone()),
            ("ApiKey".into(), api_key.clone()),
            ("UserName".into(), username.clone()),
            ("ClientIp".into(), client_ip.clone()),
            ("SLD".into(), sld.into()),
            ("TLD".into(), tld.into()),
        ];
        let mut get = params.clone();
        get.push(("Command".into(), "namecheap.domains.dns.getHosts".into()));
        let body = self.call(api_url, &get).await?;
        let (hosts, email_type) = parse_hosts(&body)?;
        if hosts.is_empty() && have.is_some() {
            return Err(DnsError::Transient(
                "getHosts listed no records although ours was published; not writing".into(),
            ));
        }
        let changed = change_hosts(&hosts, &host, want, have, config.ttl)?;
        if same_records(&changed, &hosts) {
            return Ok(());
        }
        params.push(("Command".into(), "namecheap.domains.dns.setHosts".into()));
        if let Some(email_type) = email_type {
            params.push(("EmailType".into(), email_type));
        }
        for (i, host) in changed.iter().enumerate() {
            let n = i + 1;
            params.push((format!("HostName{n}"), host.name.clone()));
            params.push((format!("RecordType{n}"), host.kind.clone()));
            params.push((format!("Address{n}"), host.address.clone()));
            params.push((format!("TTL{n}"), host.ttl.clone()));
            if !host.mx_pref.is_empty() {
                params.push((format!("MXPref{n}"), host.mx_pref.clone()));
            }
        }
        let body = self.call(api_url, &params).await?;
        let doc = roxmltree::Document::parse(&body)
            .map_err(|e| DnsError::Transient(format!("setHosts answer is not XML: {e}")))?;
        api_status(&doc)?;
        let ok = doc
            .descendants()
            .find(|n| n.has_tag_name("DomainDNSSetHostsResult"))
            .and_then(|n| n.attribute("IsSuccess"))
            == Some("true");
        if !ok {
            return Err(DnsError::Transient(
                "setHosts did not report success".into(),
            ));
        }
        Ok(())
    }

    async fn call(&self, url: &str, params: &[(String, String)]) -> Result<String, DnsError> {
        let response = self
            .http
            .post(url)
            .form(params)
            .send()
            .await
            .map_err(|e| DnsError::Transient(format!("Namecheap API: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(DnsError::Transient(format!(
                "Namecheap API answered {status}"
            )));
        }
        response
            .text()
            .await
            .map_err(|e| DnsError::Transient(format!("Namecheap API: {e}")))
    }
}

fn api_status(doc: &roxmltree::Document<'_>) -> Result<(), DnsError> {
    let root = doc.root_element();
    if !root.has_tag_name("ApiResponse") {
        return Err(DnsError::Transient("answer is not an ApiResponse".into()));
    }
    if root.attribute("Status") == Some("OK") {
        return Ok(());
    }
    let errors: Vec<String> = root
        .descendants()
        .filter(|n| n.has_tag_name("Error"))
        .map(|n| {
            format!(
                "{} (error {})",
                n.text().unwrap_or("").trim(),
                n.attribute("Number").unwrap_or("?")
            )
        })
        .collect();
    Err(DnsError::Transient(format!(
        "Namecheap API error: {}",
        errors.join("; ")
    )))
}

/// Whether two host lists hold the same records, in any order.
fn same_records(a: &[Host], b: &[Host]) -> bool {
    let key = |h: &Host| {
        (
            h.name.to_lowercase(),
            h.kind.clone(),
            h.address.clone(),
            h.ttl.clone(),
            h.mx_pref.clone(),
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

/// The host list and EmailType of a getHosts answer; anything unexpected is an error, so a
/// bad read is never followed by a write.
pub fn parse_hosts(body: &str) -> Result<(Vec<Host>, Option<String>), DnsError> {
    let doc = roxmltree::Document::parse(body)
        .map_err(|e| DnsError::Transient(format!("getHosts answer is not XML: {e}")))?;
    api_status(&doc)?;
    let result = doc
        .descendants()
        .find(|n| n.has_tag_name("DomainDNSGetHostsResult"))
        .ok_or_else(|| DnsError::Transient("getHosts answer has no host list".into()))?;
    let mut hosts = Vec::new();
    for node in result.children().filter(|n| n.is_element()) {
        let field = |name: &str| {
            node.attribute(name)
                .map(str::to_string)
                .ok_or_else(|| DnsError::Transient(format!("a host in getHosts has no {name}")))
        };
        if !node.tag_name().name().eq_ignore_ascii_case("host") {
            continue;
        }
        hosts.push(Host {
            name: field("Name")?,
            kind: field("Type")?,
            address: field("Address")?,
            ttl: field("TTL")?,
            mx_pref: node.attribute("MXPref").unwrap_or("").to_string(),
        });
    }
    Ok((hosts, result.attribute("EmailType").map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, kind: &str, address: &str) -> Host {
        Host {
            name: name.into(),
            kind: kind.into(),
            address: address.into(),
            ttl: "1800".into(),
            mx_pref: "10".into(),
        }
    }

    #[test]
    fn only_our_record_changes_and_conflicts_are_refused() {
        let zone = vec![
            host("@", "A", "192.0.2.1"),
            host("www", "CNAME", "example.org."),
            host("edge01", "A", "192.0.2.10"),
            host("taken", "TXT", "hello"),
        ];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let moved =
            change_hosts(&zone, "edge01", ip("2001:db8::1"), ip("192.0.2.10"), 300).unwrap();
        assert_eq!(
            &moved[..3],
            &[zone[0].clone(), zone[1].clone(), zone[3].clone()]
        );
        assert_eq!(
            (moved[3].kind.as_str(), moved[3].address.as_str()),
            ("AAAA", "2001:db8::1")
        );
        let gone = change_hosts(&zone, "edge01", None, ip("192.0.2.10"), 300).unwrap();
        assert_eq!(gone.len(), 3);
        // Not published by us: someone else's record.
        assert!(matches!(
            change_hosts(&zone, "edge01", ip("192.0.2.11"), None, 300),
            Err(DnsError::Refused(_))
        ));
        assert!(matches!(
            change_hosts(&zone, "taken", ip("192.0.2.12"), None, 300),
            Err(DnsError::Refused(_))
        ));
        assert!(matches!(
            change_hosts(&zone, "edge02", ip("192.0.2.1"), None, 300),
            Err(DnsError::Refused(_))
        ));
    }

    #[test]
    fn a_bad_or_failed_read_is_an_error() {
        assert!(parse_hosts("<ApiResponse Status=\"OK\"><CommandResp").is_err());
        let failed = r#"<ApiResponse Status="ERROR"><Errors><Error Number="1011150">Invalid request IP</Error></Errors></ApiResponse>"#;
        let e = parse_hosts(failed).unwrap_err().to_string();
        assert!(e.contains("1011150"), "{e}");
        let ok = r#"<ApiResponse Status="OK" xmlns="http://api.namecheap.com/xml.response"><CommandResponse><DomainDNSGetHostsResult Domain="example.org" EmailType="FWD"><host HostId="1" Name="@" Type="MX" Address="mx.example.org." MXPref="5" TTL="60"/></DomainDNSGetHostsResult></CommandResponse></ApiResponse>"#;
        let (hosts, email) = parse_hosts(ok).unwrap();
        assert_eq!(email.as_deref(), Some("FWD"));
        assert_eq!(hosts[0].mx_pref, "5");
    }
}
