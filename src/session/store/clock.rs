use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use crate::time::{from_unix_millis, millis, unix_millis};

/// Where a store in process memory reads the time: the system clock, or a [`ManualClock`] in
/// tests.
///
/// Expiry in Redis runs on Redis's own clock (key TTLs), so only the stores that decide expiry
/// themselves take one: [`MemoryStore`](super::MemoryStore) and the local copy of a
/// [`FallbackStore`](super::FallbackStore).
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock, [`SystemTime::now`]. The default.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to, so a test can let a session expire without sleeping.
///
/// Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use tower_turnstile::session::{ManualClock, MemoryStore};
///
/// let clock = ManualClock::new();
/// let store = MemoryStore::builder().clock(clock.clone()).build();
/// // ... create a session with a 15-minute inactivity timeout, then:
/// clock.advance(Duration::from_secs(16 * 60));
/// // ... the session is gone.
/// # let _ = store;
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing the system time of its creation.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// A clock showing `time` (to the millisecond).
    pub fn at(time: SystemTime) -> Self {
        Self {
            now_ms: Arc::new(AtomicU64::new(unix_millis(time))),
        }
    }

    /// Moves the clock forward by `by` (to the millisecond).
    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(millis(by), Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        from_unix_millis(self.now_ms.load(Ordering::Relaxed))
    }
}

/// The clock a store holds: shared, cheap to clone.
#[derive(Clone)]
pub(crate) struct SharedClock(Arc<dyn Clock>);

impl SharedClock {
    pub(crate) fn new(clock: impl Clock) -> Self {
        Self(Arc::new(clock))
    }

    /// The time in Unix milliseconds.
    pub(crate) fn now_ms(&self) -> u64 {
        unix_millis(self.0.now())
    }
}

/// A store hands its clock on (the fallback store to its local copy).
impl Clock for SharedClock {
    fn now(&self) -> SystemTime {
        self.0.now()
    }
}

impl Default for SharedClock {
    fn default() -> Self {
        Self::new(SystemClock)
    }
}

impl fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = ManualClock::at(start);
        let twin = clock.clone();
        assert_eq!(clock.now(), start);
        twin.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), start + Duration::from_millis(1500));
    }
}
