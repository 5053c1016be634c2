//! `[dns]` of head.toml: the settings as written, and their checked form.

pub use crate::cli::{DnsSettings, NamecheapSettings};

/// Namecheap's production endpoint.
pub const NAMECHEAP_URL: &str = "https://api.namecheap.com/xml.response";
/// TTL of the records unless configured.
pub const DEFAULT_TTL: u32 = 300;

/// Validated DNS configuration.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Zone.
    pub zone: String,
    /// TTL.
    pub ttl: u32,
    /// Provider.
    pub provider: ProviderConfig,
}

/// Which provider, with its settings.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// Log only.
    None,
    /// Namecheap.
    Namecheap {
        /// Endpoint.
        api_url: String,
        /// ApiUser.
        api_user: String,
        /// ApiKey.
        api_key: String,
        /// UserName.
        username: String,
        /// ClientIp.
        client_ip: String,
        /// The registered domain the zone is in.
        domain: String,
    },
}

impl DnsSettings {
    /// Checks the settings; the error names the key.
    pub fn resolve(self) -> Result<DnsConfig, (String, String)> {
        let err = |key: &str, reason: &str| (format!("dns.{key}"), reason.to_string());
        let ttl = self.ttl.unwrap_or(DEFAULT_TTL);
        if !(60..=60000).contains(&ttl) {
            return Err(err("ttl", "must be between 60 and 60000 seconds"));
        }
        let zone = self
            .zone
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_lowercase();
        if !zone.is_empty() {
            crate::input::check_subdomain(&zone).map_err(|r| err("zone", &r.to_string()))?;
        }
        let provider = match self.provider.as_deref().unwrap_or("none") {
            "none" => ProviderConfig::None,
            "namecheap" => {
                if !zone.contains('.') {
                    return Err(err("zone", "namecheap needs the domain, e.g. example.org"));
                }
                let n = self.namecheap.unwrap_or_default();
                let need = |v: Option<String>, key: &str| {
                    v.filter(|v| !v.is_empty())
                        .ok_or_else(|| err(&format!("namecheap.{key}"), "is required"))
                };
                let client_ip = need(n.client_ip, "client_ip")?;
                if client_ip.parse::<std::net::Ipv4Addr>().is_err() {
                    return Err(err("namecheap.client_ip", "must be an IPv4 address"));
                }
                let domain = n
                    .domain
                    .map(|d| d.trim_end_matches('.').to_lowercase())
                    .unwrap_or_else(|| zone.clone());
                if !(zone == domain || zone.ends_with(&format!(".{domain}")))
                    || !domain.contains('.')
                {
                    return Err(err(
                        "namecheap.domain",
                        "must be the zone or a domain it is in",
                    ));
                }
                let api_url = n.api_url.unwrap_or_else(|| NAMECHEAP_URL.into());
                if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
                    return Err(err("namecheap.api_url", "must be an http(s):// URL"));
                }
                ProviderConfig::Namecheap {
                    api_url,
                    api_user: need(n.api_user, "api_user")?,
                    api_key: need(n.api_key, "api_key")?,
                    username: need(n.username, "username")?,
                    client_ip,
                    domain,
                }
            }
            _ => return Err(err("provider", "must be none or namecheap")),
        };
        Ok(DnsConfig {
            zone,
            ttl,
            provider,
        })
    }
}
