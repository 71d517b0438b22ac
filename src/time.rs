//! Times as the stores keep them: whole milliseconds (or microseconds) since the Unix epoch,
//! saturating instead of failing, since a clock before 1970 or past the year 584 million is a
//! misconfigured machine, not a reason to refuse a request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `time` in Unix milliseconds; 0 before the epoch.
pub(crate) fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `time` in Unix microseconds; 0 before the epoch.
pub(crate) fn unix_micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The time `ms` Unix milliseconds stand for.
#[cfg_attr(
    not(any(feature = "memory", feature = "redis", feature = "postgres")),
    allow(dead_code)
)]
pub(crate) fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The time `us` Unix microseconds stand for.
pub(crate) fn from_unix_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

/// Now, in Unix milliseconds.
pub(crate) fn now_millis() -> u64 {
    unix_millis(SystemTime::now())
}

/// `duration` in whole milliseconds.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_saturate_instead_of_failing() {
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(
            unix_millis(from_unix_millis(1_700_000_000_123)),
            1_700_000_000_123
        );
        assert_eq!(unix_micros(from_unix_millis(2)), 2_000);
    }

    #[test]
    fn times_before_the_epoch_read_as_zero() {
        assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(unix_micros(UNIX_EPOCH + Duration::from_nanos(1_999)), 1);
    }
}
