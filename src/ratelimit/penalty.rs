//! The penalty box: a key refused again and again is blocked, for longer each time.

use std::{fmt, str::FromStr, time::Duration};

use super::{Quota, algorithm::Terms};
use crate::ConfigError;

/// Blocks for repeat offenders: a key refused `strikes` times within one window of its quota
/// is blocked for `block`; each further block, while it keeps being refused, is twice as long,
/// up to `max_block` (default 1 hour). A key that goes `quiet` (default: `max_block`) without
/// a counted refusal after its last block is forgiven, and its next block is `block` again.
///
/// With Redis, the strikes and the block live next to the counter and are decided in the same
/// script, on Redis's clock, so every instance agrees; every instance also learns of a new
/// block within [`Penalty::BROADCAST_DELAY`] and refuses the key from memory until the block
/// ends. A blocked request gets `429` with `Retry-After` set to the block's remaining time
/// (gRPC: `RESOURCE_EXHAUSTED`). The memory store and the local fallback keep the same rules.
///
/// ```
/// use std::time::Duration;
/// use tower_turnstile::ratelimit::{Penalty, Policy, Quota};
///
/// // Refused 5 times within a minute: blocked 30 s, then 1 min, 2 min … at most 1 h.
/// let login = Policy::new("login", Quota::per_minute(10))?
///     .with_penalty(Penalty::new(5, Duration::from_secs(30))?);
/// assert_eq!("5/30s".parse::<Penalty>()?, Penalty::new(5, Duration::from_secs(30))?);
/// # let _ = login;
/// # Ok::<(), tower_turnstile::ConfigError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Penalty {
    strikes: u32,
    block: Duration,
    max_block: Duration,
    quiet: Option<Duration>,
}

impl fmt::Debug for Penalty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Penalty")
            .field("strikes", &self.strikes)
            .field("block", &self.block)
            .field("max_block", &self.max_block)
            .field("quiet", &self.quiet())
            .finish()
    }
}

/// The longest block or quiet period: a day. Longer would outlive any sensible deployment of a
/// rate limit, and keeps every time an exact integer in Lua.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl Penalty {
    /// How late an instance learns of a block another instance placed, at most (plus one
    /// round trip to Redis): each layer with a penalty reads new blocks this often.
    pub const BROADCAST_DELAY: Duration = Duration::from_millis(100);

    /// `strikes` refusals within one window block the key for `block`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Penalty`] when `strikes` is 0, or `block` is under a millisecond or
    /// over a day.
    pub fn new(strikes: u32, block: Duration) -> Result<Self, ConfigError> {
        let penalty = Self {
            strikes,
            block,
            max_block: Duration::from_secs(3600).max(block),
            quiet: None,
        };
        penalty.checked()
    }

    /// The longest block the doubling reaches. Default: 1 hour (or `block`, if longer).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Penalty`] when it is shorter than the first block or over a day.
    pub fn with_max_block(mut self, max: Duration) -> Result<Self, ConfigError> {
        self.max_block = max;
        self.checked()
    }

    /// How long a key must go without a counted refusal, after its last block ended, to be
    /// forgiven. Default: the longest block.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Penalty`] when it is under a millisecond or over a day.
    pub fn with_quiet(mut self, quiet: Duration) -> Result<Self, ConfigError> {
        self.quiet = Some(quiet);
        self.checked()
    }

    /// Refusals within one window that block the key.
    pub fn strikes(&self) -> u32 {
        self.strikes
    }

    /// The first block.
    pub fn block(&self) -> Duration {
        self.block
    }

    /// The longest block.
    pub fn max_block(&self) -> Duration {
        self.max_block
    }

    /// The quiet period after which offences are forgotten.
    pub fn quiet(&self) -> Duration {
        self.quiet.unwrap_or(self.max_block)
    }

    fn checked(self) -> Result<Self, ConfigError> {
        let ms = Duration::from_millis(1);
        let reason = if self.strikes == 0 {
            "strikes must be at least 1"
        } else if !(ms..=MAX_DURATION).contains(&self.block) {
            "a block must be between 1 ms and a day"
        } else if !(self.block..=MAX_DURATION).contains(&self.max_block) {
            "the longest block must be between the first block and a day"
        } else if !(ms..=MAX_DURATION).contains(&self.quiet()) {
            "the quiet period must be between 1 ms and a day"
        } else {
            return Ok(self);
        };
        Err(ConfigError::Penalty(reason))
    }

    /// The terms in microseconds, counting strikes in `quota`'s window.
    pub(crate) fn terms(&self, quota: Quota) -> Terms {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Terms {
            strikes: u64::from(self.strikes),
            window: quota.window_ms() * 1000,
            block: micros(self.block),
            max_block: micros(self.max_block),
            quiet: micros(self.quiet()),
        }
    }
}

impl FromStr for Penalty {
    type Err = ConfigError;

    /// `N/<duration>`, as a [`Quota`] is written: `N` refusals within a window, then a block of
    /// `<duration>` (`5/30s`), with the other settings at their defaults.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let written: Quota = text.parse()?;
        let strikes = u32::try_from(written.limit())
            .map_err(|_| ConfigError::Penalty("strikes must be at most 4294967295"))?;
        Self::new(strikes, written.window())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_with_a_reason() {
        let s = Duration::from_secs;
        assert!(Penalty::new(0, s(1)).is_err());
        assert!(Penalty::new(1, Duration::ZERO).is_err());
        assert!(Penalty::new(1, s(90_000)).is_err());
        assert!(
            Penalty::new(3, s(10))
                .unwrap()
                .with_max_block(s(5))
                .is_err()
        );
        assert!(
            Penalty::new(3, s(10))
                .unwrap()
                .with_quiet(Duration::ZERO)
                .is_err()
        );
        let error = Penalty::new(0, s(1)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid penalty: strikes must be at least 1"
        );
        assert!("0/30s".parse::<Penalty>().is_err());
        assert!("5/30".parse::<Penalty>().is_err());
    }

    #[test]
    fn defaults_double_to_an_hour_and_forgive_after_the_longest_block() {
        let penalty: Penalty = "5/30s".parse().unwrap();
        assert_eq!(penalty.max_block(), Duration::from_secs(3600));
        assert_eq!(penalty.quiet(), Duration::from_secs(3600));
        let long = Penalty::new(1, Duration::from_secs(7200)).unwrap();
        assert_eq!(long.max_block(), Duration::from_secs(7200));
    }
}
