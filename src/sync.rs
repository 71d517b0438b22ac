//! Locks that outlive a panic.
//!
//! Every critical section in this crate is bookkeeping made of plain assignments (a counter,
//! a map entry, a cached connection): a panic inside one cannot leave the data half-written,
//! so a poisoned lock is still safe to use, and refusing it would turn one panicking request
//! into a failure of every later one.

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak},
    time::Duration,
};

/// Locks `mutex`, poisoned or not.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads `lock`, poisoned or not.
#[cfg_attr(not(all(feature = "redis", feature = "postgres")), allow(dead_code))]
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `lock`, poisoned or not.
#[cfg_attr(not(all(feature = "redis", feature = "postgres")), allow(dead_code))]
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `tick` every `every` (at least 10 ms) for as long as `owner` lives: the task holds it
/// weakly, so it never keeps it alive, and ends at the first tick after its last clone went.
pub(crate) async fn every_while_alive<T, F, Fut>(owner: Weak<T>, every: Duration, mut tick: F)
where
    F: FnMut(Arc<T>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(owner) = owner.upgrade() else {
            return;
        };
        tick(owner).await;
    }
}
