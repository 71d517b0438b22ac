//! The TTL a read or a save sends before it knows the session's own inactivity timeout.
//!
//! A read is one pipelined round trip (`TIME`, `HGETALL`, `PEXPIRE`), so the `PEXPIRE` that
//! restarts the session's inactivity clock leaves before the session's own timeout is known.
//! It sends the timeout most sessions this store has read and created lately have had; when
//! the session's own differs (a minority chose another with `Session::set_expiry`), or its
//! absolute end is nearer, a second round trip sets the right TTL.

use std::sync::atomic::{AtomicU64, Ordering};

/// The inactivity timeout a read or write assumes before any vote: the session layer's default.
const DEFAULT_IDLE_MS: u64 = 24 * 3600 * 1000;

/// A running majority vote (Boyer–Moore) over the inactivity timeouts of the sessions a store
/// reads and creates: if one timeout is held by most of them, it wins. One atomic word (the
/// candidate's milliseconds above a 16-bit count), so the request path takes no lock; a race
/// between two votes loses one of them, which only makes the guess a little slower to change.
#[derive(Debug, Default)]
pub(super) struct IdleVote(AtomicU64);

impl IdleVote {
    const COUNT_BITS: u32 = 16;
    const MAX_COUNT: u64 = 64;

    /// The winning inactivity timeout (ms), or `None` before any vote.
    fn winner(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) >> Self::COUNT_BITS {
            0 => None,
            idle => Some(idle),
        }
    }

    pub(super) fn vote(&self, idle_ms: u64) {
        // Timeouts past 2^48 ms (8900 years) vote as that.
        let idle_ms = idle_ms.clamp(1, u64::MAX >> Self::COUNT_BITS);
        let mask = (1 << Self::COUNT_BITS) - 1;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (candidate, count) = (word >> Self::COUNT_BITS, word & mask);
                let (candidate, count) = if candidate == idle_ms {
                    if count == Self::MAX_COUNT {
                        // Settled: no write, so reads on every core share the word unmodified.
                        return None;
                    }
                    (candidate, count + 1)
                } else if count == 0 {
                    (idle_ms, 1)
                } else {
                    (candidate, count - 1)
                };
                Some(candidate << Self::COUNT_BITS | count)
            });
    }
}

impl IdleVote {
    /// The TTL (ms) to send with a read or save of a session whose timeout is not known yet.
    pub(super) fn guess(&self) -> u64 {
        self.winner().unwrap_or(DEFAULT_IDLE_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::IdleVote;

    #[test]
    fn the_idle_vote_follows_the_majority() {
        let vote = IdleVote::default();
        assert_eq!(vote.winner(), None);
        // Two sessions in three have the default; the rest a "remember me" timeout.
        for _ in 0..100 {
            vote.vote(1_800_000);
            vote.vote(1_800_000);
            vote.vote(2_592_000_000);
        }
        assert_eq!(vote.winner(), Some(1_800_000));
        // The population changes: the long timeout becomes the majority, and wins.
        for _ in 0..200 {
            vote.vote(2_592_000_000);
            vote.vote(2_592_000_000);
            vote.vote(1_800_000);
        }
        assert_eq!(vote.winner(), Some(2_592_000_000));
    }

    #[test]
    fn the_idle_vote_takes_any_timeout() {
        let vote = IdleVote::default();
        vote.vote(0);
        assert_eq!(vote.winner(), Some(1));
        vote.vote(u64::MAX);
        vote.vote(u64::MAX);
        assert_eq!(vote.winner(), Some(u64::MAX >> IdleVote::COUNT_BITS));
    }
}
