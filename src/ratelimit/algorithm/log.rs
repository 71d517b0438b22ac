//! The sliding log, as `store/lua/sliding_log.lua` computes it.

use std::collections::BTreeMap;

use super::Counted;

/// Sliding log: how many units were spent at each time (µs), like the sorted set of
/// `lua/sliding_log.lua` with its members counted per score.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Log {
    spent: BTreeMap<u64, u64>,
    count: u64,
}

impl Log {
    pub(crate) fn decide(&mut self, now: u64, window: u64, limit: u64, cost: u64) -> Counted {
        // A unit spent at t counts while now < t + window; trimming is kept even when the
        // check is denied, as the script's ZREMRANGEBYSCORE is.
        if let Some(oldest_kept) = (now + 1).checked_sub(window) {
            let kept = self.spent.split_off(&oldest_kept);
            let gone: u64 = self.spent.values().sum();
            self.count -= gone;
            self.spent = kept;
        }
        let allowed = cost <= limit && self.count + cost <= limit;
        if allowed && cost > 0 {
            *self.spent.entry(now).or_default() += cost;
            self.count += cost;
        }
        let reset = self
            .spent
            .last_key_value()
            .map_or(0, |(&newest, _)| newest + window - now);
        let remaining = limit.saturating_sub(self.count);
        let retry = if allowed || cost > limit {
            None
        } else {
            // The same cost fits once the (count + cost - limit) oldest units have left.
            let rank = self.count + cost - limit;
            let mut seen = 0;
            self.spent.iter().find_map(|(&at, &units)| {
                seen += units;
                (seen >= rank).then(|| at + window - now)
            })
        };
        Counted {
            allowed,
            remaining,
            reset,
            retry,
            blocked: false,
        }
    }
}

impl Log {
    /// Gives back `units` of a cost counted at `reserved_at` (those that left the window need
    /// none). `lua/refund_log.lua`, line for line.
    pub(crate) fn refund(&mut self, units: u64, reserved_at: u64) {
        if let Some(held) = self.spent.get_mut(&reserved_at) {
            let back = units.min(*held);
            *held -= back;
            self.count -= back;
            if *held == 0 {
                self.spent.remove(&reserved_at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::algorithm::test_support::*;

    #[test]
    fn sliding_log_counts_every_unit_for_one_window() {
        let mut log = Log::default();
        for step in 0..5 {
            assert!(log.decide(T0 + step * 100_000, S, 5, 1).allowed);
        }
        // Full: the oldest unit (at T0) leaves at T0 + 1 s.
        let now = T0 + 900_000;
        assert_eq!(
            log.decide(now, S, 5, 1),
            denied(0, S - 500_000, Some(100_000))
        );
        // Cost 3 waits for the third oldest.
        assert_eq!(
            log.decide(now, S, 5, 3),
            denied(0, S - 500_000, Some(300_000))
        );
        assert_eq!(log.decide(now, S, 5, 6), denied(0, S - 500_000, None));
        // At T0 + 1 s exactly the first unit is gone.
        assert_eq!(log.decide(T0 + S, S, 5, 1), allowed(0, S));
        assert_eq!(log.count, 5);
        assert_eq!(log.spent.len(), 5);
    }
}
