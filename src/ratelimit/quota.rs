use std::{fmt, str::FromStr, time::Duration};

use crate::ConfigError;

/// How much may be spent per window: `limit` units of cost every `window`.
///
/// ```
/// use std::time::Duration;
/// use tower_turnstile::ratelimit::Quota;
///
/// assert_eq!(Quota::per_minute(100), Quota::new(100, Duration::from_secs(60))?);
/// assert_eq!("100/60s".parse::<Quota>()?, Quota::per_minute(100));
/// assert_eq!("5/m".parse::<Quota>()?, Quota::per_minute(5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u64,
    window_ms: u64,
    /// The sliding window's resolution for this quota (see [`sliding_ticks`]), worked out once
    /// rather than on every decision: it takes divisions.
    tick: u64,
    ticks: u64,
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("limit", &self.limit)
            .field("window", &self.window())
            .finish()
    }
}

/// Every product of the sliding-window arithmetic stays below this, so that the Lua scripts'
/// doubles compute it exactly.
pub(crate) const EXACT: u64 = 1 << 51;

/// The resolution (µs) at which the sliding window weighs the previous window, and the window
/// in those ticks: 1 µs unless `limit * window` is so large that products would pass
/// [`EXACT`] (`lua/sliding_window.lua` works it out the same way).
pub(crate) const fn sliding_ticks(window: u64, limit: u64) -> (u64, u64) {
    // The usual case, without a division: `window <= EXACT / (3 * (limit + 1))`.
    if let Some(product) = window.checked_mul(3 * (limit + 1))
        && product <= EXACT
    {
        return (1, window);
    }
    let max_ticks = EXACT / (3 * (limit + 1));
    let tick = window.div_ceil(max_ticks);
    (tick, window.div_ceil(tick))
}

const MAX_WINDOW_MS: u64 = 365 * 24 * 3600 * 1000;
const MAX_LIMIT: u64 = 1_000_000_000;

impl Quota {
    /// `limit` per `window`. A limit of 0 denies everything (a blocked plan, say).
    pub fn new(limit: u64, window: Duration) -> Result<Self, ConfigError> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if window_ms == 0 || window_ms > MAX_WINDOW_MS {
            return Err(ConfigError::QuotaWindow);
        }
        if limit > MAX_LIMIT {
            return Err(ConfigError::QuotaLimit);
        }
        Ok(Self::of(limit, window_ms))
    }

    /// A quota from values already checked.
    /// A quota of `limit` per `window_ms`, with `Quota::new`'s bound on the limit.
    #[track_caller]
    const fn bounded(limit: u32, window_ms: u64) -> Self {
        assert!(
            limit as u64 <= MAX_LIMIT,
            "a quota limit must be at most 1000000000"
        );
        Self::of(limit as u64, window_ms)
    }

    const fn of(limit: u64, window_ms: u64) -> Self {
        let (tick, ticks) = sliding_ticks(window_ms * 1000, limit);
        Self {
            limit,
            window_ms,
            tick,
            ticks,
        }
    }

    /// `limit` per second.
    ///
    /// # Panics
    ///
    /// If `limit` is over the bound [`Quota::new`] enforces (1 000 000 000): meant for
    /// literals, where the check runs at compile time in a `const`.
    #[track_caller]
    pub const fn per_second(limit: u32) -> Self {
        Self::bounded(limit, 1000)
    }

    /// `limit` per minute.
    ///
    /// # Panics
    ///
    /// If `limit` is over the bound [`Quota::new`] enforces (1 000 000 000): meant for
    /// literals, where the check runs at compile time in a `const`.
    #[track_caller]
    pub const fn per_minute(limit: u32) -> Self {
        Self::bounded(limit, 60_000)
    }

    /// `limit` per hour.
    ///
    /// # Panics
    ///
    /// If `limit` is over the bound [`Quota::new`] enforces (1 000 000 000): meant for
    /// literals, where the check runs at compile time in a `const`.
    #[track_caller]
    pub const fn per_hour(limit: u32) -> Self {
        Self::bounded(limit, 3_600_000)
    }

    /// How much may be spent per window.
    pub const fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub const fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    pub(crate) const fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The sliding window's `(tick, ticks)` for this quota (see [`sliding_ticks`]).
    pub(crate) const fn sliding_ticks(&self) -> (u64, u64) {
        (self.tick, self.ticks)
    }

    /// The same window with `share` of the limit (rounded down, at least 1 when the limit is
    /// not 0): what one instance may grant alone when the shared store is unreachable.
    pub fn share(&self, share: f64) -> Self {
        // The whole quota is the quota itself (no float round trip for huge limits).
        if self.limit == 0 || share >= 1.0 {
            return *self;
        }
        let scaled = (self.limit as f64 * share.clamp(0.0, 1.0)).floor() as u64;
        Self::of(scaled.max(1), self.window_ms)
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.window_ms.is_multiple_of(1000) {
            write!(f, "{}/{}s", self.limit, self.window_ms / 1000)
        } else {
            write!(f, "{}/{}ms", self.limit, self.window_ms)
        }
    }
}

impl FromStr for Quota {
    type Err = ConfigError;

    /// `N/<duration>`: the duration is a number with a unit (`ms`, `s`, `m`, `h`), or a bare
    /// unit meaning one of it (`100/m`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || ConfigError::QuotaSyntax(text.to_owned());
        let (limit, window) = text.trim().split_once('/').ok_or_else(syntax)?;
        let limit: u64 = limit.trim().parse().map_err(|_| syntax())?;
        let window = window.trim();
        let digits = window
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(syntax)?;
        let (amount, unit) = window.split_at(digits);
        let amount: u64 = if amount.is_empty() {
            1
        } else {
            amount.parse().map_err(|_| syntax())?
        };
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(syntax()),
        };
        let window_ms = amount
            .checked_mul(unit_ms)
            .ok_or(ConfigError::QuotaWindow)?;
        Self::new(limit, Duration::from_millis(window_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(
            "100/60s".parse::<Quota>().ok(),
            Some(Quota::per_minute(100))
        );
        assert_eq!("100/1m".parse::<Quota>().ok(), Some(Quota::per_minute(100)));
        assert_eq!("7/h".parse::<Quota>().ok(), Some(Quota::per_hour(7)));
        assert_eq!(
            "10/500ms".parse::<Quota>().unwrap().window(),
            Duration::from_millis(500)
        );
        assert_eq!(
            " 3 / 2s ".parse::<Quota>().unwrap(),
            Quota::new(3, Duration::from_secs(2)).unwrap()
        );
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "100",
            "/60s",
            "x/60s",
            "100/60",
            "100/60d",
            "100/0s",
            "-1/s",
            "100/99999999999999h",
        ] {
            assert!(bad.parse::<Quota>().is_err(), "{bad:?}");
        }
        assert!(matches!(
            Quota::new(MAX_LIMIT + 1, Duration::from_secs(1)),
            Err(ConfigError::QuotaLimit)
        ));
    }

    #[test]
    fn the_per_unit_constructors_keep_the_bound_of_new() {
        assert_eq!(Quota::per_minute(1_000_000_000).limit(), 1_000_000_000);
        let over = std::panic::catch_unwind(|| Quota::per_second(1_000_000_001));
        assert!(over.is_err(), "over the bound that Quota::new refuses");
        assert!(Quota::new(1_000_000_001, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn share_rounds_down_but_never_to_zero() {
        assert_eq!(Quota::per_minute(100).share(0.25).limit(), 25);
        assert_eq!(Quota::per_minute(3).share(0.1).limit(), 1);
        assert_eq!(Quota::per_minute(0).share(0.5).limit(), 0);
    }
}
