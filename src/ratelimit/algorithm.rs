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
