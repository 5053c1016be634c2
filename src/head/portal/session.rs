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
    /// Their registration, which must still hold the name.
    pub uid: String,
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
        format!("v1.{username}.{uid}.{issued}.{expires}.{mac}")
    }

    /// The session `cookie` holds if it is well formed, signed by these keys and unexpired at
    /// `now_ms` (issued at most [`CLOCK_SKEW`] ahead of it, by a head whose clock runs
    /// ahead). Checked before anything is looked up; whether its registration still holds
    /// the name and whether the user signed out since are the caller's to check.
    pub fn open(&self, cookie: &str, now_ms: i64) -> Option<Session> {
        let parts: Vec<&str> = cookie.split('.').collect();
        let ["v1", username, uid, issued, expires, mac] = parts[..] else {
            return None;
        };
        let expected = self.mac(&["session v1", username, uid, issued, expires]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            mac.as_bytes(),
        )) {
            return None;
        }
        let (issued_ms, expires_ms) = (issued.parse::<i64>().ok()?, expires.parse::<i64>().ok()?);
        let skew = CLOCK_SKEW.as_millis() as i64;
        if expires_ms <= now_ms || issued_ms > now_ms.saturating_add(skew) {
            return None;
        }
        Some(Session {
            username: username.to_string(),
            uid: uid.to_string(),
            issued_ms,
        })
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

/// How far ahead of this head's clock another head's may run.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Sign-in attempts allowed per username from one address within [`WINDOW`] (per pair, so
/// nobody locks a user out from elsewhere).
pub const PER_USER: u32 = 5;
/// Sign-in attempts allowed per address within [`WINDOW`].
pub const PER_ADDRESS: u32 = 20;
/// How long attempts are counted.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Most usernames and addresses counted at once; past it the oldest windows go.
const TRACKED: usize = 10_000;

/// Counts sign-in attempts per key (`user:NAME@IP`, `addr:IP`) in fixed windows; a success
/// forgets them. In memory, per head: a restart or another head starts counting afresh,
/// which bounds guessing per head.
#[derive(Default)]
pub struct Limiter {
    attempts: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Limiter {
    /// Counts an attempt of every key in `keys` (each with its limit) if none is at its limit;
    /// otherwise counts nothing and says how long until the busiest may try again. One lock,
    /// so attempts racing each other are all counted.
    pub fn attempt(&self, keys: &[(&str, u32)]) -> Result<(), Duration> {
        let mut attempts = crate::node::lock(&self.attempts);
        let mut wait = Duration::ZERO;
        for (key, limit) in keys {
            if let Some((count, since)) = attempts.get(*key)
                && *count >= *limit
                && since.elapsed() < WINDOW
            {
                wait = wait.max(WINDOW.saturating_sub(since.elapsed()));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (key, _) in keys {
            if attempts.len() >= TRACKED && !attempts.contains_key(*key) {
                attempts.retain(|_, (_, since)| since.elapsed() < WINDOW);
                if attempts.len() >= TRACKED
                    && let Some(oldest) = attempts
                        .iter()
                        .min_by_key(|(_, (_, since))| *since)
                        .map(|(k, _)| k.clone())
                {
                    attempts.remove(&oldest);
                }
            }
            let entry = attempts
                .entry(key.to_string())
                .or_insert((0, Instant::now()));
            if entry.1.elapsed() >= WINDOW {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
        }
        Ok(())
    }

    /// Forgets the attempts of `keys` (a successful sign-in).
    pub fn clear(&self, keys: &[&str]) {
        let mut attempts = crate::node::lock(&self.attempts);
        for key in keys {
            attempts.remove(*key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_only_as_issued_until_it_expires() {
        let keys = Keys::new([7; 32], Duration::from_secs(60));
        let cookie = keys.issue("ada", "uid-1", 1_000_000);
        let session = keys.open(&cookie, 1_000_500).unwrap();
        assert_eq!(
            (session.username.as_str(), session.uid.as_str()),
            ("ada", "uid-1")
        );
        assert!(keys.open(&cookie, 1_060_000).is_none(), "expired");
        assert!(
            keys.open(&cookie, 990_000).is_some(),
            "a head's clock a little behind"
        );
        assert!(
            keys.open(&cookie, 900_000).is_none(),
            "issued far in the future"
        );
        let other = Keys::new([8; 32], Duration::from_secs(60));
        assert!(other.open(&cookie, 1_000_500).is_none(), "another CA's key");
        for forged in [
            cookie.replace("v1.ada.", "v1.bob."),
            cookie.replace(".uid-1.", ".uid-2."),
            cookie.replace(".1060000.", ".9060000."),
        ] {
            assert!(keys.open(&forged, 1_000_500).is_none(), "{forged}");
        }
        for bad in ["", "v1.ada", "v2.ada.u.1.2.ff", &format!("{cookie}.x")] {
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
    fn attempts_past_a_limit_wait_for_the_window_and_a_success_forgets_them() {
        let limiter = Limiter::default();
        let keys = [
            ("user:ada@192.0.2.1", PER_USER),
            ("addr:192.0.2.1", PER_ADDRESS),
        ];
        for _ in 0..PER_USER {
            assert!(limiter.attempt(&keys).is_ok());
        }
        let wait = limiter.attempt(&keys).unwrap_err();
        assert!(wait > Duration::from_secs(60) && wait <= WINDOW);
        // Not from another address: nobody locks ada out from elsewhere.
        let elsewhere = [
            ("user:ada@192.0.2.9", PER_USER),
            ("addr:192.0.2.9", PER_ADDRESS),
        ];
        assert!(limiter.attempt(&elsewhere).is_ok());
        limiter.clear(&["user:ada@192.0.2.1"]);
        assert!(limiter.attempt(&keys).is_ok());
    }
}
