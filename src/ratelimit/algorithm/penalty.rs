//! The penalty box, as `store/lua/penalty.lua` computes it: refusals counted per key, and
//! blocks that double while a key keeps offending.

use super::Counted;

/// A penalty's terms in microseconds, as the Lua script gets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Terms {
    /// Refusals within one window that start a block (at least 1).
    pub(crate) strikes: u64,
    /// The window the refusals are counted in: the quota's.
    pub(crate) window: u64,
    /// The first block.
    pub(crate) block: u64,
    /// The longest block.
    pub(crate) max_block: u64,
    /// How long a key stays without a counted refusal, after its last block, before its
    /// offences are forgotten.
    pub(crate) quiet: u64,
}

/// How many doublings a block can take: past this, any block is at its cap anyway, and the
/// product stays a power-of-two multiple that both Rust and Lua compute exactly.
const MAX_LEVEL: u64 = 40;

/// One key's offences (times in µs since the epoch), as `penalty.lua` keeps them in the hash
/// next to the counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Offences {
    /// Refusals counted in the current strike window (`s`).
    strikes: u64,
    /// When the current strike window started (`f`).
    since: u64,
    /// When the current block ends (`u`); in the past when none holds.
    until: u64,
    /// How many blocks the key has had since it was last forgiven (`l`).
    level: u64,
    /// The last counted refusal or the end of the last block, whichever is later (`q`).
    last: u64,
}

/// What the penalty box made of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Judged {
    /// The decision, a block's included.
    pub(crate) counted: Counted,
    /// When a block this check placed ends (µs since the epoch); `None` when it placed none.
    pub(crate) new_block_until: Option<u64>,
}

impl Offences {
    /// Decides one check at `now`: refused while a block holds (the counter is not looked at);
    /// otherwise `decide` counts it, and a refusal is a strike that may start a block.
    /// `penalty.lua`, line for line.
    pub(crate) fn judge<E>(
        &mut self,
        now: u64,
        terms: Terms,
        costs: bool,
        decide: impl FnOnce() -> Result<Counted, E>,
    ) -> Result<Judged, E> {
        if self.until > now {
            let left = self.until - now;
            return Ok(Judged {
                counted: Counted::blocked(left),
                new_block_until: None,
            });
        }
        if now.saturating_sub(self.last) >= terms.quiet {
            *self = Self::default();
        }
        let mut counted = decide()?;
        // A refusal of a cost that could fit is a strike; one that never fits (a cost over the
        // limit) is the policy's doing, not the client's.
        if counted.allowed || !costs || counted.retry.is_none() {
            return Ok(Judged {
                counted,
                new_block_until: None,
            });
        }
        let Some(block) = self.strike(now, terms) else {
            return Ok(Judged {
                counted,
                new_block_until: None,
            });
        };
        counted.remaining = 0;
        counted.reset = counted.reset.max(block);
        counted.retry = counted.retry.map(|retry| retry.max(block));
        counted.blocked = true;
        Ok(Judged {
            counted,
            new_block_until: Some(self.until),
        })
    }

    /// Counts one refusal at `now`; the length of the block it starts, if it does.
    fn strike(&mut self, now: u64, terms: Terms) -> Option<u64> {
        if self.strikes == 0 || now.saturating_sub(self.since) >= terms.window {
            self.strikes = 0;
            self.since = now;
        }
        self.strikes += 1;
        self.last = self.last.max(now);
        if self.strikes < terms.strikes {
            return None;
        }
        let block = terms
            .block
            .saturating_mul(1 << self.level.min(MAX_LEVEL))
            .min(terms.max_block);
        self.level += 1;
        self.strikes = 0;
        self.until = now + block;
        self.last = self.until;
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::algorithm::test_support::*;

    const TERMS: Terms = Terms {
        strikes: 3,
        window: 10 * S,
        block: 5 * S,
        max_block: 12 * S,
        quiet: 60 * S,
    };

    /// A refusal that could fit, as a limit of 1 answers a second request.
    fn refused() -> Result<Counted, ()> {
        Ok(denied(0, S, Some(S)))
    }

    fn judge(offences: &mut Offences, at: u64) -> Judged {
        offences.judge(at, TERMS, true, refused).unwrap()
    }

    #[test]
    fn the_third_refusal_in_a_window_blocks_and_each_next_block_doubles_to_the_cap() {
        let mut offences = Offences::default();
        assert_eq!(judge(&mut offences, T0).new_block_until, None);
        assert_eq!(judge(&mut offences, T0 + S).new_block_until, None);
        let first = judge(&mut offences, T0 + 2 * S);
        assert_eq!(first.new_block_until, Some(T0 + 7 * S));
        assert!(first.counted.blocked);
        assert_eq!(first.counted.retry, Some(5 * S));
        // While blocked, the counter is not asked.
        let during = offences
            .judge(T0 + 3 * S, TERMS, true, || -> Result<Counted, ()> {
                panic!("asked while blocked")
            })
            .unwrap();
        assert_eq!(during.counted, Counted::blocked(4 * S));
        // Three more refusals after it: 10 s, then the cap of 12 s.
        for at in [7, 8] {
            assert_eq!(judge(&mut offences, T0 + at * S).new_block_until, None);
        }
        assert_eq!(
            judge(&mut offences, T0 + 9 * S).new_block_until,
            Some(T0 + 19 * S)
        );
        for at in [19, 20] {
            judge(&mut offences, T0 + at * S);
        }
        assert_eq!(
            judge(&mut offences, T0 + 21 * S).new_block_until,
            Some(T0 + 33 * S)
        );
    }

    #[test]
    fn strikes_are_counted_within_one_window() {
        let mut offences = Offences::default();
        judge(&mut offences, T0);
        judge(&mut offences, T0 + S);
        // The window of the first strike is over: counting starts again.
        assert_eq!(judge(&mut offences, T0 + 10 * S).new_block_until, None);
        assert_eq!(judge(&mut offences, T0 + 11 * S).new_block_until, None);
        assert!(judge(&mut offences, T0 + 12 * S).new_block_until.is_some());
    }

    #[test]
    fn a_quiet_period_forgets_the_offences() {
        let mut offences = Offences::default();
        for at in 0..3 {
            judge(&mut offences, T0 + at * S);
        }
        // The block ended at 7 s; quiet until 67 s: the next block is the first again.
        for at in [67, 68] {
            judge(&mut offences, T0 + at * S);
        }
        assert_eq!(
            judge(&mut offences, T0 + 69 * S).new_block_until,
            Some(T0 + 74 * S)
        );
    }

    #[test]
    fn allowed_requests_and_costs_that_never_fit_are_no_strikes() {
        let mut offences = Offences::default();
        for at in 0..5 {
            let allowed = offences
                .judge(T0 + at, TERMS, true, || Ok::<_, ()>(allowed(1, S)))
                .unwrap();
            assert!(!allowed.counted.blocked);
            let never = offences
                .judge(T0 + at, TERMS, true, || Ok::<_, ()>(denied(0, S, None)))
                .unwrap();
            assert_eq!(never.new_block_until, None);
            let reads = offences.judge(T0 + at, TERMS, false, refused).unwrap();
            assert_eq!(reads.new_block_until, None);
        }
        assert_eq!(offences, Offences::default());
    }
}
