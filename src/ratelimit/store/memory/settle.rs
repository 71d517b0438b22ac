//! Settlements in memory: the steps of `lua/settle.lua`, on a key's state.

use super::{State, WrongAlgorithm, decide};
use crate::ratelimit::{Algorithm, Quota, algorithm::Counted};

/// Corrects a reservation of `reserved` counted at `reserved_at` to `actual`, at `now` (µs):
/// a refund where it was counted, a top-up spent now up to what is left; then the state as a
/// check of cost 0 finds it, answered as allowed. `settle.lua`, line for line.
pub(super) fn settle(
    state: &mut State,
    algorithm: Algorithm,
    now: u64,
    quota: Quota,
    (reserved_at, reserved, actual): (u64, u64, u64),
) -> Result<Counted, WrongAlgorithm> {
    if actual < reserved {
        refund(state, algorithm, now, quota, reserved_at, reserved - actual);
    }
    let mut counted = decide(state, algorithm, now, quota, 0)?;
    if actual > reserved && counted.remaining > 0 {
        let top_up = (actual - reserved).min(counted.remaining);
        counted = decide(state, algorithm, now, quota, top_up)?;
    }
    Ok(Counted {
        allowed: true,
        retry: None,
        blocked: false,
        ..counted
    })
}

/// The algorithm's refund, when the key holds that algorithm's state (otherwise the decision
/// that follows reports the mismatch, as Redis answers `WRONGTYPE`).
fn refund(
    state: &mut State,
    algorithm: Algorithm,
    now: u64,
    quota: Quota,
    reserved_at: u64,
    units: u64,
) {
    let (window, limit) = (quota.window_ms() * 1000, quota.limit());
    match (algorithm, state) {
        (Algorithm::SlidingWindow, State::Window(counts)) => {
            counts.refund(units, reserved_at, window);
        }
        (Algorithm::SlidingLog, State::Log(log)) => log.refund(units, reserved_at),
        (Algorithm::Gcra, State::Gcra(gcra)) => gcra.refund(units, now, window, limit),
        _ => {}
    }
}
