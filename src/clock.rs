//! The wall clock, in the two forms edgesync stores: RFC 3339 text and unix seconds.

use k8s_openapi::jiff::Timestamp;

/// Now, RFC 3339.
pub fn now() -> String {
    Timestamp::now().to_string()
}

/// Now, in unix seconds.
pub fn unix_now() -> i64 {
    Timestamp::now().as_second()
}
