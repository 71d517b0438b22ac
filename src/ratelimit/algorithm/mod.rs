//! The counting algorithms: pure functions over one key's state, which the memory store calls
//! and the Lua scripts mirror, so that one trace gives one sequence of decisions on both.

use std::time::Duration;

use super::store::Decision;

mod gcra;
mod log;
mod penalty;
mod window;

pub(crate) use gcra::Gcra;
pub(crate) use log::Log;
pub(crate) use penalty::{Offences, Terms};
pub(crate) use window::Window;

/// How a quota is counted.
///
/// Each algorithm runs atomically in one round trip on Redis (one Lua script touching one key,
/// with time from Redis `TIME`), and the in-memory store makes the same decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// Sliding-window counter (the default): this window's count plus the previous window's,
    /// weighted by how much of it still overlaps the sliding window. O(1) memory per key; it
    /// never grants more than the limit within any window-long span that starts on a window
    /// boundary, and smooths bursts at window edges.
    #[default]
    SlidingWindow,
    /// Sliding log: one timestamp per unit spent, exact over every window-long span. Memory
    /// grows with the limit, so keep it for small limits such as login attempts.
    SlidingLog,
    /// Generic cell rate algorithm: requests are spaced `window / limit` apart, with bursts up
    /// to the limit. O(1) memory per key.
    Gcra,
}

impl Algorithm {
    /// A short lower-case name, used in keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlidingWindow => "sliding-window",
            Self::SlidingLog => "sliding-log",
            Self::Gcra => "gcra",
        }
    }
}

/// A decision, with durations in microseconds, as the Lua scripts return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) allowed: bool,
    pub(crate) remaining: u64,
    pub(crate) reset: u64,
    pub(crate) retry: Option<u64>,
    /// Refused by a penalty block (see [`Offences`]).
    pub(crate) blocked: bool,
}

impl Counted {
    /// Refused by a block that ends in `left` µs: nothing to spend until then.
    pub(crate) fn blocked(left: u64) -> Self {
        Self {
            allowed: false,
            remaining: 0,
            reset: left,
            retry: Some(left),
            blocked: true,
        }
    }

    pub(crate) fn into_decision(self, limit: u64) -> Decision {
        let reset = Duration::from_micros(self.reset);
        let mut decision = if self.allowed {
            Decision::allowed(limit, self.remaining, reset)
        } else {
            Decision::denied(
                limit,
                self.remaining,
                reset,
                self.retry.map(Duration::from_micros),
            )
        };
        decision.blocked = self.blocked;
        decision
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Counted;

    pub(crate) const S: u64 = 1_000_000;
    /// A decision time on a window boundary of every window used in the tests (µs since the
    /// epoch).
    pub(crate) const T0: u64 = 1_700_000_000 * S;

    pub(crate) fn allowed(remaining: u64, reset: u64) -> Counted {
        Counted {
            allowed: true,
            remaining,
            reset,
            retry: None,
            blocked: false,
        }
    }

    pub(crate) fn denied(remaining: u64, reset: u64, retry: Option<u64>) -> Counted {
        Counted {
            allowed: false,
            remaining,
            reset,
            retry,
            blocked: false,
        }
    }
}
