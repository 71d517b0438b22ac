//! The sliding-window counter, as `store/lua/sliding_window.lua` computes it.

use super::Counted;

/// Sliding-window counter: the count of the current fixed window (`index`) and of the one
/// before it. The arithmetic is `lua/sliding_window.lua`'s, line for line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Window {
    index: u64,
    current: u64,
    previous: u64,
}

impl Window {
    #[cfg(test)]
    pub(crate) fn decide(&mut self, now: u64, window: u64, limit: u64, cost: u64) -> Counted {
        let resolution = crate::ratelimit::quota::sliding_ticks(window, limit);
        self.decide_in_ticks(now, window, limit, cost, resolution)
    }

    /// Decides in the resolution `(tick, ticks)` that
    /// [`sliding_ticks`](crate::ratelimit::quota::sliding_ticks) gives for `window` and `limit`.
    pub(crate) fn decide_in_ticks(
        &mut self,
        now: u64,
        window: u64,
        limit: u64,
        cost: u64,
        (tick, ticks): (u64, u64),
    ) -> Counted {
        let mut now = now;
        let mut index = self.index_at(now, window);
        let (mut current, mut previous) = (0, 0);
        if self.index >= index {
            // Only an explicit time can be earlier than the stored window; it counts as that
            // window's start, so that time never runs backwards for one key.
            if self.index > index {
                index = self.index;
                now = index * window;
            }
            (current, previous) = (self.current, self.previous);
        } else if self.index + 1 == index {
            previous = self.current;
        }
        let start = index * window;
        let elapsed = if tick == 1 {
            now - start
        } else {
            // Below a window, far below 2^53: exact in doubles, and quicker than dividing.
            ((now - start) as f64 / tick as f64) as u64
        };
        let overlap = ticks - elapsed;

        // u128 only matters for a key whose counts were made under a much larger quota:
        // under one quota every product stays below 2^51, as in the script.
        let weighted = wide(previous, overlap);
        let allowed = cost <= limit && weighted + wide(current + cost, ticks) <= wide(limit, ticks);
        if allowed && cost > 0 {
            current += cost;
            *self = Self {
                index,
                current,
                previous,
            };
        }

        let previous_share = ceil_div(weighted, ticks);
        let remaining = limit.saturating_sub(current).saturating_sub(previous_share);
        let reset = if current > 0 {
            start + 2 * window - now
        } else if previous > 0 {
            start + window - now
        } else {
            0
        };
        let retry = if allowed || cost > limit {
            None
        } else {
            Some(Self::retry(
                now,
                start,
                window,
                (tick, ticks),
                limit,
                current,
                previous,
                cost,
            ))
        };
        Counted {
            allowed,
            remaining,
            reset,
            retry,
            blocked: false,
        }
    }

    /// Gives back `units` of a cost counted at `reserved_at`: to this window's count if it is
    /// still the current one, or to the previous count if it is the one before.
    /// `lua/refund_window.lua`, line for line.
    pub(crate) fn refund(&mut self, units: u64, reserved_at: u64, window: u64) {
        let reserved = reserved_at / window;
        if reserved == self.index {
            self.current -= units.min(self.current);
        } else if reserved + 1 == self.index {
            self.previous -= units.min(self.previous);
        }
    }

    /// `now / window`, the index of the window `now` falls in; found without a division when
    /// it is the stored window or the next one, as it is for a key in use.
    fn index_at(&self, now: u64, window: u64) -> u64 {
        if let Some(start) = self.index.checked_mul(window)
            && let Some(since) = now.checked_sub(start)
        {
            if since < window {
                return self.index;
            }
            if since - window < window {
                return self.index + 1;
            }
        }
        now / window
    }

    /// The earliest time (µs from `now`) at which `cost` fits, if nothing else is spent.
    #[allow(clippy::too_many_arguments)]
    fn retry(
        now: u64,
        start: u64,
        window: u64,
        (tick, ticks): (u64, u64),
        limit: u64,
        current: u64,
        previous: u64,
        cost: u64,
    ) -> u64 {
        // Later in this window, once the previous count's weight has shrunk enough...
        if let Some(spare) = limit.checked_sub(current + cost)
            && previous > 0
        {
            let need = ticks.saturating_sub(narrow(wide(spare, ticks) / u128::from(previous)));
            if need < ticks {
                return (start + need * tick).saturating_sub(now);
            }
        }
        // ...or in the next window, where this window's count becomes the previous one, or at
        // the start of the one after, when nothing counts any more.
        let need = wide(limit - cost, ticks)
            .checked_div(u128::from(current))
            .map_or(0, |fits| ticks.saturating_sub(narrow(fits)));
        if need < ticks {
            start + window + need * tick - now
        } else {
            start + 2 * window - now
        }
    }
}

/// `ceil(n / d)`, through a floating-point division where it is exact (a 64-bit integer
/// division takes several times longer, and this runs on every request). For integers below
/// 2^53, `floor(n / d)` computed in doubles is the integer quotient: the true quotient lies at
/// least `1/d` below the next integer, more than half a unit in the last place of the result.
/// This is also how the Lua script computes it.
pub(crate) fn ceil_div(n: u128, d: u64) -> u64 {
    const DOUBLE_EXACT: u64 = 1 << 52;
    match u64::try_from(n) {
        Ok(0) => 0,
        Ok(n) if n < DOUBLE_EXACT && d < DOUBLE_EXACT && d > 0 => {
            // Both below 2^53: exact as doubles. The quotient is not negative, so the cast's
            // truncation is the floor (and needs no call to `floor`).
            ((n + d - 1) as f64 / d as f64) as u64
        }
        _ => narrow(n.div_ceil(u128::from(d.max(1)))),
    }
}

pub(crate) fn wide(a: u64, b: u64) -> u128 {
    u128::from(a) * u128::from(b)
}

pub(crate) fn narrow(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{
        algorithm::test_support::*,
        quota::{EXACT, sliding_ticks},
    };

    #[test]
    fn ticks_are_microseconds_unless_products_would_pass_2_pow_51() {
        assert_eq!(sliding_ticks(60 * S, 100), (1, 60 * S));
        assert_eq!(sliding_ticks(3600 * S, 100_000), (1, 3600 * S));
        assert_eq!(sliding_ticks(3600 * S, 1_000_000), (5, 720 * S));
        // A year at a billion: ticks coarsen, and every product stays exact.
        let year = 365 * 24 * 3600 * S;
        let (tick, ticks) = sliding_ticks(year, 1_000_000_000);
        assert!(tick > 1);
        assert!(3 * (1_000_000_000 + 1) * ticks <= EXACT);
        assert!(ticks * tick >= year && (ticks - 1) * tick < year);
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let mut w = Window::default();
        // 10 per second; spend it all half-way through a window.
        let half = T0 + S / 2;
        assert_eq!(w.decide(half, S, 10, 10), allowed(0, S / 2 + S));
        // Denied: in the next window the 10 weigh 10 * (1 - e) and 1 fits once e >= 0.1.
        assert_eq!(
            w.decide(half, S, 10, 1),
            denied(0, S / 2 + S, Some(S / 2 + S / 10))
        );
        // A quarter into the next window, 10 * 0.75 = 7.5 still count: 2 remain.
        let quarter = T0 + S + S / 4;
        assert_eq!(w.decide(quarter, S, 10, 0), allowed(2, 3 * S / 4));
        assert_eq!(w.decide(quarter, S, 10, 2), allowed(0, 2 * S - S / 4));
        // One more fits once 10 * (1 - e) + 2 + 1 <= 10, at e = 0.3: 50 ms from now.
        assert_eq!(
            w.decide(quarter, S, 10, 1),
            denied(0, 2 * S - S / 4, Some(S / 20))
        );
        assert_eq!(
            w,
            Window {
                index: T0 / S + 1,
                current: 2,
                previous: 10
            }
        );
    }

    #[test]
    fn sliding_window_retry_is_the_first_microsecond_that_fits() {
        // 3 per 7 ms windows: 3/7 does not divide evenly, so the earliest time is rounded up.
        let window = 7_000;
        let start = T0 / window * window + window;
        let mut w = Window::default();
        assert!(w.decide(start, window, 3, 3).allowed);
        let next = start + window;
        let denial = w.decide(next, window, 3, 1);
        let retry = denial.retry.expect("a wait");
        assert!(!w.decide(next + retry - 1, window, 3, 1).allowed);
        assert!(w.decide(next + retry, window, 3, 1).allowed);
        // 3 * (7000 - e) <= 2 * 7000  <=>  e >= 2333.33..: the first whole microsecond is 2334.
        assert_eq!(retry, 2_334);
    }

    #[test]
    fn sliding_window_full_cost_waits_until_nothing_counts() {
        let mut w = Window::default();
        assert!(w.decide(T0, S, 4, 1).allowed);
        // Cost 4 = limit needs the estimate at 0: two windows after this one started.
        assert_eq!(
            w.decide(T0 + 10, S, 4, 4),
            denied(3, 2 * S - 10, Some(2 * S - 10))
        );
    }

    #[test]
    fn sliding_window_denials_spend_nothing_and_time_does_not_run_back() {
        let mut w = Window::default();
        assert!(w.decide(T0 + S, S, 2, 2).allowed);
        let before = w;
        assert!(!w.decide(T0 + S, S, 2, 1).allowed);
        assert!(!w.decide(T0 + S, S, 2, 3).allowed);
        assert_eq!(w, before);
        // An earlier time counts as the stored window's start.
        assert_eq!(w.decide(T0, S, 2, 0), w.decide(T0 + S, S, 2, 0));
    }

    #[test]
    fn counts_made_under_a_larger_quota_do_not_overflow() {
        let year = 365 * 24 * 3600 * S;
        let start = (T0 / year + 1) * year;
        let mut w = Window::default();
        assert!(w.decide(start, year, 1_000_000_000, 1_000_000_000).allowed);
        // Next window, the quota cut to 1 a year: 10^9 weighed in µs ticks passes u64.
        let denial = w.decide(start + year, year, 1, 1);
        assert_eq!(denial, denied(0, year, Some(year)));
    }

    #[test]
    fn the_window_index_without_a_division_is_the_quotient() {
        let window = 60 * S;
        for stored in [0, 1, 29_000_000, 29_000_001] {
            let counts = Window {
                index: stored,
                current: 1,
                previous: 0,
            };
            for now in [
                0,
                window - 1,
                stored * window,
                stored * window + 1,
                (stored + 1) * window - 1,
                (stored + 1) * window,
                (stored + 2) * window - 1,
                (stored + 2) * window,
                (stored + 7) * window + 3,
                u64::MAX,
            ] {
                assert_eq!(counts.index_at(now, window), now / window, "{stored} {now}");
            }
        }
        let huge = Window {
            index: u64::MAX / 2,
            current: 1,
            previous: 0,
        };
        assert_eq!(huge.index_at(5 * window, window), 5);
    }

    #[test]
    fn ceil_div_in_doubles_is_the_integer_ceiling() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let exact = |n: u128, d: u64| narrow(n.div_ceil(u128::from(d)));
        for _ in 0..200_000 {
            // Numerators and divisors of every size below 2^52, and quotients near integers.
            let d = (next() >> (12 + next() % 52)).max(1);
            let n = u128::from(next() >> (12 + next() % 52));
            assert_eq!(ceil_div(n, d), exact(n, d), "{n} / {d}");
            let k = u128::from(next() % 1_000_000_001);
            for near in [
                k * u128::from(d),
                (k * u128::from(d)).saturating_sub(1),
                k * u128::from(d) + 1,
            ] {
                assert_eq!(ceil_div(near, d), exact(near, d), "{near} / {d}");
            }
        }
        assert_eq!(ceil_div(0, 7), 0);
        assert_eq!(
            ceil_div(u128::from(u64::MAX) * 3, 2),
            exact(u128::from(u64::MAX) * 3, 2)
        );
    }

    #[test]
    fn the_division_free_tick_agrees_with_the_division_at_its_edge() {
        for limit in [1, 7, 100, 99_999, 1_000_000_000] {
            let edge = EXACT / (3 * (limit + 1));
            assert_eq!(sliding_ticks(edge, limit), (1, edge));
            let (tick, _) = sliding_ticks(edge + 1, limit);
            assert_eq!(tick, 2, "limit {limit}");
        }
    }
}
