//! The rate-limit script's reply (the server's bytes, RESP2 or RESP3) to a decision.
//!
//! Properties:
//! - any reply reads as a decision or as a failed check, never a panic;
//! - a decision never leaves more than the limit, and only a refusal carries a wait;
//! - a reply of seven integers in one text reads as what they say: allowed only on `1`, the
//!   remaining count held to `[0, limit]`, negative times read as none.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis::Value;
use tower_turnstile::fuzzing::ScriptDecision;

// The limit (8 bytes, little-endian), then the reply as the server sent it.
fuzz_target!(|bytes: &[u8]| {
    let Some((limit, reply)) = bytes.split_first_chunk::<8>() else {
        return;
    };
    let limit = u64::from_le_bytes(*limit);
    let Ok(reply) = redis::parse_redis_value(reply) else {
        return;
    };
    let Some(decision) = ScriptDecision::read(&reply, limit) else {
        return;
    };
    assert!(decision.remaining <= limit, "{decision:?} under {limit}");
    if decision.allowed {
        assert_eq!(decision.retry_us, None, "an allowed request told to wait");
    }
    if let Value::BulkString(text) = &reply
        && let Ok(text) = std::str::from_utf8(text)
        && let Ok(numbers) = text.split(' ').map(str::parse).collect::<Result<Vec<i64>, _>>()
        && let [allowed, remaining, reset, retry, _, _, _] = numbers[..]
    {
        let wait = |us: i64| u64::try_from(us).unwrap_or(0);
        assert_eq!(decision.allowed, allowed == 1);
        assert_eq!(decision.remaining, wait(remaining).min(limit));
        assert_eq!(decision.reset_us, wait(reset));
        let expected_retry = (allowed != 1 && retry >= 0).then(|| wait(retry));
        assert_eq!(decision.retry_us, expected_retry);
    }
});
