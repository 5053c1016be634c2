//! What keeps a portal visitor signed in and their forms their own, the same on every head:
//! sessions and form tokens are MACs under a key derived from the CA the heads share, so no
//! head keeps sessions; a sign-out is recorded with the user (every session issued before it
//! ends). Sign-in attempts are limited per username and per address.

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie. `__Host-`: only over HTTPS, for this host and every path.
pub const SESSION_COOKIE: &str = "__Host-edgesync-session";
/// The cookie form tokens are made from.
pub const CSRF_COOKIE: &str = "__Host-edgesync-csrf";

/// Makes and checks sessions and form tokens.
#[derive(Clone)]
pub struct Keys {
    key: [u8; 32],
    /// How long a session lasts.
    pub lifetime: Duration,
}

/// A session that checked out: who, and when it began (unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The user.
    pub username: String,
    /// When it was issued.
    pub issued_ms: i64,
}

impl Keys {
    /// Keys from `key` (see [`crate::transport::tls::Ca::derive_key`]).
    pub fn new(key: [u8; 32], lifetime: Duration) -> Keys {
        Keys { key, lifetime }
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// A session of `username` (registration `uid`) issued at `now_ms`: the cookie value.
    pub fn issue(&self, username: &str, uid: &str, now_ms: i64) -> String {
        let expires = now_ms.saturating_add(self.lifetime.as_millis() as i64);
        let (issued, expires) = (now_ms.to_string(), expires.to_string());
        let mac = self.mac(&["session v1", username, uid, &issued, &expires]);
        format!("v1.{username}.{issued}.{expires}.{mac}")
    }

    /// The session `cookie` holds if it is well formed, unexpired at `now_ms` and signed by
    /// these keys; its user's registration (`uid_of`) and sign-out are checked by the caller.
    pub fn open(&self, cookie: &str, now_ms: i64) -> Option<(Session, impl Fn(&str) -> bool)> {
        let mut parts = cookie.split('.');
        let (Some("v1"), Some(username), Some(issued), Some(expires), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let (issued_ms, expires_ms) = (issued.parse::<i64>().ok()?, expires.parse::<i64>().ok()?);
        if expires_ms <= now_ms || issued_ms > now_ms {
            return None;
        }
        let (keys, fields) = (
            self.clone(),
            [username, issued, expires, mac].map(str::to_string),
        );
        let signed_for = move |uid: &str| {
            let [username, issued, expires, mac] = &fields;
            let expected = keys.mac(&["session v1", username, uid, issued, expires]);
            subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), mac.as_bytes()).into()
        };
        let session = Session {
            username: username.to_string(),
            issued_ms,
        };
        Some((session, signed_for))
    }

    /// The form token for a visitor whose CSRF cookie is `cookie`.
    pub fn form_token(&self, cookie: &str) -> String {
        self.mac(&["form v1", cookie])
    }

    /// Whether `token` is the form token of `cookie`.
    pub fn form_token_matches(&self, cookie: &str, token: &str) -> bool {
        let expected = self.form_token(cookie);
        !cookie.is_empty()
            && subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), token.as_bytes()).into()
    }
}

/// Whether a session issued at `issued_ms` outlived a sign-out at `signed_out_at` (unix
/// seconds): one issued in the same second may have come before it, so it ends too.
pub fn outlived(issued_ms: i64, signed_out_at: Option<i64>) -> bool {
    signed_out_at.is_some_and(|at| issued_ms < at.saturating_add(1).saturating_mul(1000))
}

/// Failed sign-ins allowed per username within [`WINDOW`].
pub const PER_USER: u32 = 5;
/// Failed sign-ins allowed per address within [`WINDOW`].
pub const PER_ADDRESS: u32 = 20;
/// How long failed sign-ins are counted.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Most usernames and addresses counted at once; past it the oldest windows go.
const TRACKED: usize = 10_000;

/// Counts failed sign-ins per key (`user:NAME`, `addr:IP`) in fixed windows. In memory, per
/// head: a restart or another head starts counting afresh, which bounds guessing per head.
#[derive(Default)]
pub struct Limiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Limiter {
    /// Whether `key` may try again (fewer than `limit` failures in its window); when not, how
    /// long until it may.
    pub fn check(&self, key: &str, limit: u32) -> Result<(), Duration> {
        let failures = crate::node::lock(&self.failures);
        match failures.get(key) {
            Some((count, since)) if *count >= limit && since.elapsed() < WINDOW => {
                Err(WINDOW.saturating_sub(since.elapsed()))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failure of `key`.
    pub fn fail(&self, key: &str) {
        let mut failures = crate::node::lock(&self.failures);
        if failures.len() >= TRACKED && !failures.contains_key(key) {
            failures.retain(|_, (_, since)| since.elapsed() < WINDOW);
            if failures.len() >= TRACKED
                && let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| k.clone())
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures
            .entry(key.to_string())
            .or_insert((0, Instant::now()));
        if entry.1.elapsed() >= WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// Forgets the failures of `key` (a successful sign-in).
    pub fn clear(&self, key: &str) {
        crate::node::lock(&self.failures).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_only_as_issued_for_its_registration_until_it_expires() {
        let keys = Keys::new([7; 32], Duration::from_secs(60));
        let cookie = keys.issue("ada", "uid-1", 1_000_000);
        let (session, signed_for) = keys.open(&cookie, 1_000_500).unwrap();
        assert_eq!(session.username, "ada");
        assert!(signed_for("uid-1"));
        assert!(!signed_for("uid-2"), "another registration of the name");
        assert!(keys.open(&cookie, 1_060_000).is_none(), "expired");
        let other = Keys::new([8; 32], Duration::from_secs(60));
        let (_, signed_for) = other.open(&cookie, 1_000_500).unwrap();
        assert!(!signed_for("uid-1"), "another CA's key");
        let forged = cookie.replace("v1.ada.", "v1.bob.");
        let (_, signed_for) = keys.open(&forged, 1_000_500).unwrap();
        assert!(!signed_for("uid-1"));
        for bad in ["", "v1.ada", "v2.ada.1.2.ff", &format!("{cookie}.x")] {
            assert!(keys.open(bad, 1_000_500).is_none(), "{bad}");
        }
        assert!(outlived(1_000_500, Some(1_000)));
        assert!(!outlived(1_001_000, Some(1_000)));
        assert!(!outlived(1_000_500, None));
    }

    #[test]
    fn a_form_token_belongs_to_its_cookie() {
        let keys = Keys::new([7; 32], Duration::from_secs(60));
        let token = keys.form_token("abc");
        assert!(keys.form_token_matches("abc", &token));
        assert!(!keys.form_token_matches("abd", &token));
        assert!(!keys.form_token_matches("", &keys.form_token("")));
    }

    #[test]
    fn failures_past_the_limit_wait_for_the_window() {
        let limiter = Limiter::default();
        for _ in 0..PER_USER {
            assert!(limiter.check("user:ada", PER_USER).is_ok());
            limiter.fail("user:ada");
        }
        let wait = limiter.check("user:ada", PER_USER).unwrap_err();
        assert!(wait > Duration::from_secs(60) && wait <= WINDOW);
        assert!(limiter.check("user:bob", PER_USER).is_ok());
        limiter.clear("user:ada");
        assert!(limiter.check("user:ada", PER_USER).is_ok());
    }
}
