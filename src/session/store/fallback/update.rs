//! Updates: from the copy this instance holds during an outage, or, when Redis refuses writes,
//! from a read of the session.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{FallbackStore, not_held};
use crate::session::store::{JournaledWrite, Patch, ReplayStore, SessionKey, StoreError, Written};

impl<P: ReplayStore> FallbackStore<P> {
    /// An update, from the copy this instance holds during an outage.
    /// `refused` tells whether Redis refused the write for lack of memory.
    pub(super) async fn update_held(
        &self,
        key: &SessionKey,
        patch: &Patch,
        refused: &AtomicBool,
    ) -> Result<Written, StoreError> {
        let local = &self.inner.local;
        let redis = async {
            let written = self.inner.primary.update(key, patch).await;
            if let Err(error) = &written {
                refused.store(error.refuses_writes(), Ordering::Relaxed);
            }
            written
        };
        self.either(
            Some(key),
            redis,
            |written| match written {
                Written::Applied => {
                    let _ = local.patch(key, patch);
                }
                Written::Missing => local.remove(key, None),
            },
            || {
                if self.inner.held(key).is_none() {
                    return Err(not_held());
                }
                self.inner.journal(JournaledWrite::Update {
                    key: key.clone(),
                    patch: patch.clone(),
                })?;
                Ok(local.patch(key, patch))
            },
        )
        .await
    }

    /// An update of a session this instance holds no copy of, which Redis refused (out of
    /// memory): Redis still serves reads, so the session is read from it and the write
    /// journaled as for a held one. `None` when the read fails too.
    pub(super) async fn update_unheld(
        &self,
        key: &SessionKey,
        patch: &Patch,
    ) -> Option<Result<Written, StoreError>> {
        let record = self.inner.primary.load(key).await.ok()?;
        let local = &self.inner.local;
        let Some(record) = record else {
            return Some(Ok(Written::Missing));
        };
        local.put(key, &record);
        let journaled = self.inner.journal(JournaledWrite::Update {
            key: key.clone(),
            patch: patch.clone(),
        });
        Some(journaled.map(|()| local.patch(key, patch)))
    }
}
