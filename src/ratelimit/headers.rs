//! The answers of the rate-limit layer: `RateLimit` / `RateLimit-Policy` fields
//! (draft-ietf-httpapi-ratelimit-headers), `429` with `Retry-After`, and gRPC's
//! `RESOURCE_EXHAUSTED`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use super::store::Decision;

/// `RateLimit-Policy`.
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Whole seconds, rounded up.
fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `Retry-After` in whole seconds, rounded up and at least 1: a client that waits that long
/// is never refused again for the same reason, and `0` would invite an immediate retry.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

/// The two header values for a policy and a decision, built once per policy and request.
pub(crate) fn policy_value(name: &str, limit: u64, window: Duration) -> HeaderValue {
    // Policy names are validated to token characters, so quoting needs no escapes.
    let text = format!("\"{name}\";q={limit};w={}", ceil_secs(window).max(1));
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("\"policy\""))
}

pub(crate) fn ratelimit_value(name: &str, decision: &Decision) -> HeaderValue {
    // On every response: built by hand rather than with `format!`.
    let mut remaining = itoa::Buffer::new();
    let mut reset = itoa::Buffer::new();
    let (remaining, reset) = (
        remaining.format(decision.remaining),
        reset.format(ceil_secs(decision.reset)),
    );
    let parts = ["\"", name, "\";r=", remaining, ";t=", reset];
    // Exactly the length: `Bytes` then takes the vector over as it is, with no second
    // allocation for a shared buffer.
    let mut text = Vec::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        text.extend_from_slice(part.as_bytes());
    }
    HeaderValue::from_maybe_shared(Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static("\"policy\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn field_syntax() {
        assert_eq!(
            policy_value("per-ip", 100, Duration::from_secs(60)),
            "\"per-ip\";q=100;w=60"
        );
        assert_eq!(
            policy_value("fast", 10, Duration::from_millis(500)),
            "\"fast\";q=10;w=1"
        );
        let decision = Decision::allowed(100, 57, Duration::from_millis(11_200));
        assert_eq!(ratelimit_value("per-ip", &decision), "\"per-ip\";r=57;t=12");
    }
}
