use std::{
    fmt,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use crate::sync::lock;

/// When the circuit breaker opens and how long it stays open.
///
/// After `failure_threshold` outages in a row (timeouts, refused or broken connections) the
/// breaker opens: calls fail at once with [`BackendError::CircuitOpen`](super::BackendError)
/// and their callers use their fallback. After `open_for`, one call is let through as a probe;
/// if it succeeds the breaker closes, otherwise it stays open for another `open_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct BreakerConfig {
    pub(crate) failure_threshold: u32,
    pub(crate) open_for: Duration,
}

impl Default for BreakerConfig {
    /// Three outages in a row open the breaker for one second.
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        }
    }
}

impl BreakerConfig {
    /// How many outages in a row open the breaker (at least 1).
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// How long the breaker stays open before a probe is let through.
    pub fn open_for(mut self, duration: Duration) -> Self {
        self.open_for = duration;
        self
    }
}

/// The state of the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Redis answers; calls go through.
    Closed,
    /// Redis failed; calls fail fast until the next probe.
    Open,
    /// One probe call is in flight; others fail fast until it returns.
    HalfOpen,
}

impl BreakerState {
    /// A short lower-case name (`closed`, `open`, `half_open`), as used in health reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Status {
    phase: Phase,
    since: SystemTime,
    last_error: Option<(String, SystemTime)>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) successes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

/// The breaker shared by every clone of one backend.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    status: Mutex<Status>,
    pub(crate) counters: Counters,
}

/// A snapshot of the breaker, for health reports.
pub(crate) struct BreakerView {
    pub(crate) state: BreakerState,
    pub(crate) since: SystemTime,
    pub(crate) last_error: Option<(String, SystemTime)>,
    pub(crate) consecutive_failures: u32,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            status: Mutex::new(Status {
                phase: Phase::Closed { failures: 0 },
                since: SystemTime::now(),
                last_error: None,
            }),
            counters: Counters::default(),
        }
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        lock(&self.status)
    }

    /// Asks to make a call. `None` means the breaker is open and the call must not be tried.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Permit> {
        let mut status = self.status();
        let probe = match status.phase {
            Phase::Closed { .. } => false,
            Phase::Open { until } if Instant::now() >= until => {
                status.phase = Phase::HalfOpen;
                true
            }
            Phase::Open { .. } | Phase::HalfOpen => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        Some(Permit {
            breaker: Arc::clone(self),
            probe,
            settled: false,
        })
    }

    fn on_success(&self, probe: bool) {
        self.counters.successes.fetch_add(1, Ordering::Relaxed);
        let mut status = self.status();
        match status.phase {
            Phase::Closed { ref mut failures } => *failures = 0,
            // A call admitted before the breaker opened may succeed after it did; only the
            // probe decides when an open breaker closes.
            Phase::Open { .. } => {}
            Phase::HalfOpen if probe => {
                status.phase = Phase::Closed { failures: 0 };
                status.since = SystemTime::now();
                crate::metrics::count_labeled(
                    "turnstile_breaker_transitions_total",
                    "to",
                    "closed",
                );
                tracing::info!(target: "tower_turnstile::backend", "Redis answers again; circuit breaker closed");
            }
            Phase::HalfOpen => {}
        }
    }

    fn on_failure(&self, probe: bool, error: &str) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let mut status = self.status();
        let now = SystemTime::now();
        status.last_error = Some((error.to_owned(), now));
        let open = match status.phase {
            Phase::Closed { ref mut failures } => {
                *failures += 1;
                *failures >= self.config.failure_threshold
            }
            Phase::HalfOpen => probe,
            Phase::Open { .. } => false,
        };
        if open {
            let was_closed = matches!(status.phase, Phase::Closed { .. });
            status.phase = Phase::Open {
                until: Instant::now() + self.config.open_for,
            };
            if was_closed {
                status.since = now;
                crate::metrics::count_labeled("turnstile_breaker_transitions_total", "to", "open");
                tracing::warn!(
                    target: "tower_turnstile::backend",
                    error,
                    "Redis is failing; circuit breaker open, callers use their fallback"
                );
            }
        }
    }

    /// Whether the breaker is open and a probe call would be let through now.
    pub(crate) fn probe_due(&self) -> bool {
        matches!(self.status().phase, Phase::Open { until } if Instant::now() >= until)
    }

    /// How long the breaker stays open before a probe.
    pub(crate) fn open_for(&self) -> Duration {
        self.config.open_for
    }

    pub(crate) fn view(&self) -> BreakerView {
        let status = self.status();
        let (state, consecutive_failures) = match status.phase {
            Phase::Closed { failures } => (BreakerState::Closed, failures),
            Phase::Open { .. } => (BreakerState::Open, self.config.failure_threshold),
            Phase::HalfOpen => (BreakerState::HalfOpen, self.config.failure_threshold),
        };
        BreakerView {
            state,
            since: status.since,
            last_error: status.last_error.clone(),
            consecutive_failures,
        }
    }
}

/// Leave to make one call. It must be settled with [`Permit::success`] or [`Permit::failure`];
/// one dropped unsettled (its future was cancelled) counts as a failure if it was the probe,
/// so a cancelled probe cannot leave the breaker half-open for ever.
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    settled: bool,
}

impl Permit {
    pub(crate) fn success(mut self) {
        self.settled = true;
        self.breaker.on_success(self.probe);
    }

    pub(crate) fn failure(mut self, error: &str) {
        self.settled = true;
        self.breaker.on_failure(self.probe, error);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker
                .on_failure(true, "probe cancelled before Redis answered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_for: Duration) -> Arc<Breaker> {
        Arc::new(Breaker::new(
            BreakerConfig::default()
                .failure_threshold(threshold)
                .open_for(open_for),
        ))
    }

    #[test]
    fn opens_after_threshold_and_rejects() {
        let b = breaker(2, Duration::from_secs(60));
        b.admit().unwrap().failure("x");
        assert_eq!(b.view().state, BreakerState::Closed);
        b.admit().unwrap().failure("x");
        assert_eq!(b.view().state, BreakerState::Open);
        assert!(b.admit().is_none());
        assert_eq!(b.counters.rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn success_resets_the_run_of_failures() {
        let b = breaker(2, Duration::from_secs(60));
        b.admit().unwrap().failure("x");
        b.admit().unwrap().success();
        b.admit().unwrap().failure("x");
        assert_eq!(b.view().state, BreakerState::Closed);
    }

    #[test]
    fn probe_closes_or_reopens() {
        let b = breaker(1, Duration::ZERO);
        b.admit().unwrap().failure("down");
        assert_eq!(b.view().state, BreakerState::Open);
        let probe = b.admit().expect("probe admitted once open_for elapsed");
        assert_eq!(b.view().state, BreakerState::HalfOpen);
        assert!(b.admit().is_none(), "only one probe at a time");
        probe.failure("still down");
        assert_eq!(b.view().state, BreakerState::Open);
        b.admit().unwrap().success();
        assert_eq!(b.view().state, BreakerState::Closed);
        assert_eq!(b.view().last_error.unwrap().0, "still down");
    }

    #[test]
    fn cancelled_probe_reopens() {
        let b = breaker(1, Duration::ZERO);
        b.admit().unwrap().failure("down");
        drop(b.admit().unwrap());
        assert_eq!(b.view().state, BreakerState::Open);
    }
}
