//! GCRA, as `store/lua/gcra.lua` computes it.

use super::Counted;

/// GCRA: the theoretical arrival time (µs since the epoch), as `lua/gcra.lua` keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Gcra {
    tat: Option<u64>,
}

impl Gcra {
    /// `gcra.lua`, line for line, in integers: the TAT moves `cost` emission intervals later
    /// when the cost fits within one burst of now.
    pub(crate) fn decide(&mut self, now: u64, window: u64, limit: u64, cost: u64) -> Counted {
        let interval = (window / limit).max(1);
        let burst = limit * interval;
        // A TAT in the past means a full burst is available: it counts as now.
        let tat = self.tat.map_or(now, |tat| tat.max(now));
        let ahead = tat - now;
        let allowed = cost <= limit && ahead + cost * interval <= burst;
        let ahead = if allowed && cost > 0 {
            self.tat = Some(tat + cost * interval);
            ahead + cost * interval
        } else {
            ahead
        };
        Counted {
            allowed,
            remaining: burst.saturating_sub(ahead) / interval,
            reset: ahead,
            retry: (!allowed && cost <= limit).then(|| ahead + cost * interval - burst),
            blocked: false,
        }
    }
}

impl Gcra {
    /// Gives back `units`: the TAT moves that many emission intervals earlier, but not before
    /// `now` (a TAT in the past already means a full burst). `lua/refund_gcra.lua`, line for
    /// line.
    pub(crate) fn refund(&mut self, units: u64, now: u64, window: u64, limit: u64) {
        let Some(tat) = self.tat.filter(|&tat| tat > now) else {
            return;
        };
        let interval = (window / limit).max(1);
        let back = tat.saturating_sub(units.saturating_mul(interval));
        self.tat = (back > now).then_some(back);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::algorithm::test_support::*;

    #[test]
    fn gcra_spaces_units_by_the_emission_interval() {
        let mut gcra = Gcra::default();
        // 10 per second: one every 100 ms, bursts of 10.
        assert_eq!(gcra.decide(T0, S, 10, 8), allowed(2, 800_000));
        assert_eq!(gcra.decide(T0, S, 10, 3), denied(2, 800_000, Some(100_000)));
        assert_eq!(gcra.decide(T0, S, 10, 2), allowed(0, S));
        assert_eq!(
            gcra.decide(T0 + 50_000, S, 10, 1),
            denied(0, S - 50_000, Some(50_000))
        );
        assert_eq!(gcra.decide(T0 + 100_000, S, 10, 1), allowed(0, S));
        assert_eq!(gcra.decide(T0, S, 10, 11), denied(0, S + 100_000, None));
        // Long idle: the TAT in the past reads as now.
        assert_eq!(gcra.decide(T0 + 60 * S, S, 10, 0), allowed(10, 0));
        assert_eq!(gcra.tat, Some(T0 + S + 100_000));
    }

    #[test]
    fn gcra_rounds_the_emission_interval_down_to_a_microsecond() {
        let mut gcra = Gcra::default();
        // 3 per second: 333 333 µs apart, a burst worth 999 999 µs.
        assert_eq!(gcra.decide(T0, S, 3, 3), allowed(0, 999_999));
        assert_eq!(gcra.decide(T0, S, 3, 1), denied(0, 999_999, Some(333_333)));
    }
}
