use std::time::{Duration, Instant};

use super::store::Decision;

/// An opt-in local quota lease: the limiter takes a batch of `units` of a key's quota from the
/// shared store in one round trip and spends it in this instance's memory, so most allowed
/// requests cost Redis nothing.
///
/// **What it trades.** A batch counts as spent in Redis when it is taken, and this instance may
/// spend it until it expires (`lifetime`, at most the quota's window). So:
///
/// - **Overshoot**: over any window-long span, the instances together grant at most
///   `instances × (units − 1)` more than the quota (each instance holds at most one batch per
///   key, of which the request that took it spent at least one unit). With exact algorithms
///   ([`SlidingLog`](super::Algorithm::SlidingLog), [`Gcra`](super::Algorithm::Gcra)) that is
///   the whole error; the sliding window adds its usual estimate on top.
/// - **Undershoot**: units of a batch not spent before it expires are lost to everyone until
///   the store forgets them: at most `units − 1` per instance and key per lifetime.
/// - **Near the limit it is exact**: when fewer than `units` are left, the batch is refused and
///   the request is checked on its own (a second round trip), so the last units of a quota are
///   granted one by one and a denial carries the exact retry time.
///
/// Leases apply only to shared stores (Redis), and only to requests costing less than a batch
/// (`units`, or the whole quota when that is smaller); others are checked one by one as
/// without a lease. While the store is unreachable the
/// fallback decides, as without a lease.
///
/// Good for high limits on hot keys (per tenant, per API key): with `units` at 1 % of the
/// limit, N instances overshoot by at most N %. A login limit of 5 an hour wants no lease.
///
/// ```
/// use std::time::Duration;
/// use tower_turnstile::ratelimit::{Lease, Policy, Quota, RateLimitLayer};
///
/// // 10 000 requests a minute per tenant; each instance takes 50 at a time, for at most 1 s.
/// let layer = RateLimitLayer::new(Policy::new("per-tenant", Quota::per_minute(10_000))?)
///     .with_lease(Lease::new(50).lasting(Duration::from_secs(1)));
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    units: u64,
    lifetime: Duration,
}

impl Lease {
    /// Batches of `units` (at least 2: a batch of 1 is no lease), spent for at most 1 s each.
    pub fn new(units: u64) -> Self {
        Self {
            units: units.max(2),
            lifetime: Duration::from_secs(1),
        }
    }

    /// How long a batch may be spent after it was taken (capped at the quota's window, at
    /// least 1 ms). Default: 1 s.
    #[must_use]
    pub fn lasting(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime.max(Duration::from_millis(1));
        self
    }

    /// The units of one batch.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// How long a batch may be spent.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// What this instance holds of one key's quota: the units left of its batch, until when they
/// may be spent, and the store's decision that granted the batch (for the headers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant {
    left: u64,
    taken: Instant,
    until: Instant,
    granted: Decision,
}

impl Grant {
    /// A batch the store granted at `taken`, of which `spent` units went to the request that
    /// took it.
    pub(crate) fn new(granted: Decision, units: u64, spent: u64, lifetime: Duration) -> Self {
        let taken = Instant::now();
        Self {
            left: units.saturating_sub(spent),
            taken,
            until: taken + lifetime,
            granted,
        }
    }

    /// Nothing held.
    pub(crate) fn none() -> Self {
        let now = Instant::now();
        Self {
            left: 0,
            taken: now,
            until: now,
            granted: Decision::allowed(0, 0, Duration::ZERO),
        }
    }

    /// Spends `cost` from the batch, if it holds that much and has not expired.
    pub(crate) fn spend(&mut self, cost: u64) -> Option<Decision> {
        if self.left < cost {
            return None;
        }
        let now = Instant::now();
        if now >= self.until {
            self.left = 0;
            return None;
        }
        self.left -= cost;
        Some(self.answer(now))
    }

    /// The decision for a request served from the batch: what the store had left plus what this
    /// instance still holds, and the store's reset, moved on by the time since.
    pub(crate) fn answer(&self, now: Instant) -> Decision {
        let granted = self.granted;
        Decision::allowed(
            granted.limit,
            granted
                .remaining
                .saturating_add(self.left)
                .min(granted.limit),
            granted
                .reset
                .saturating_sub(now.saturating_duration_since(self.taken)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_spent_until_empty() {
        let granted = Decision::allowed(100, 90, Duration::from_secs(60));
        let mut grant = Grant::new(granted, 10, 1, Duration::from_secs(60));
        assert_eq!(grant.answer(Instant::now()).remaining, 99);
        for left in (0..9).rev() {
            let decision = grant.spend(1).expect("units left");
            assert!(decision.allowed);
            assert_eq!(decision.remaining, 90 + left);
        }
        assert!(grant.spend(1).is_none(), "empty");
    }

    #[test]
    fn a_batch_is_not_spent_past_its_cost_or_its_lifetime() {
        let granted = Decision::allowed(100, 90, Duration::from_secs(60));
        let mut grant = Grant::new(granted, 10, 1, Duration::from_secs(60));
        assert!(grant.spend(10).is_none(), "9 left, 10 asked");
        assert!(grant.spend(9).is_some());

        let mut expired = Grant::new(granted, 10, 1, Duration::ZERO);
        assert!(expired.spend(1).is_none());
        assert!(Grant::none().spend(1).is_none());
        assert!(Grant::none().spend(0).is_none(), "expired even for nothing");
    }

    #[test]
    fn units_and_lifetime_have_floors() {
        assert_eq!(Lease::new(0).units(), 2);
        assert_eq!(
            Lease::new(5).lasting(Duration::ZERO).lifetime(),
            Duration::from_millis(1)
        );
        assert_eq!(Lease::new(5).lifetime(), Duration::from_secs(1));
    }
}
