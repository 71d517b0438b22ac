//! Deleting expired rows: reads never return them, so they are only garbage, deleted in short
//! batches so no statement holds its locks for long.

use std::time::Duration;

use super::PostgresStore;
use crate::session::store::StoreError;

impl PostgresStore {
    /// Deletes at most one batch of expired rows; returns how many went.
    pub async fn cleanup_batch(&self) -> Result<u64, StoreError> {
        let done = self
            .deadline(
                sqlx::query(&self.sql.cleanup)
                    .bind(self.cleanup_batch)
                    .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes every expired row, one batch at a time; returns how many went.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = self.cleanup_batch().await?;
            deleted += batch;
            if batch < u64::try_from(self.cleanup_batch).unwrap_or(u64::MAX) {
                return Ok(deleted);
            }
            // Let other work have the table between batches.
            tokio::task::yield_now().await;
        }
    }

    /// Runs [`cleanup`](Self::cleanup) every `interval` (the first pass at once) until the
    /// returned handle is dropped. Failures are logged and the next pass tries again.
    #[must_use = "the cleanup stops when the handle is dropped"]
    pub fn spawn_cleanup(&self, interval: Duration) -> CleanupTask {
        let store = self.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match store.cleanup().await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::debug!(
                        target: "tower_turnstile::session",
                        deleted,
                        "expired sessions deleted from PostgreSQL"
                    ),
                    Err(error) => tracing::warn!(
                        target: "tower_turnstile::session",
                        error = %error,
                        source = std::error::Error::source(&error).map(ToString::to_string),
                        "session cleanup failed; the next pass tries again"
                    ),
                }
            }
        });
        CleanupTask { task }
    }
}

/// The background cleanup of [`PostgresStore::spawn_cleanup`]; dropping it stops the task.
#[derive(Debug)]
pub struct CleanupTask {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}
