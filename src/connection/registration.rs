//! A live connection's place in the registry, and its inbox.

use std::sync::Weak;

use tokio::sync::mpsc;

use super::{Event, Registry, registry::Inner};
use crate::{metrics, tenant::Tenant};

/// A live connection's place in the registry, and its inbox. Dropping it deregisters the
/// connection, here and in Redis.
#[derive(Debug)]
pub struct Registration {
    /// Weak: a registration left alive does not keep the registry (and its tasks) alive.
    registry: Weak<Inner>,
    id: u64,
    events: mpsc::Receiver<Event>,
}

impl Registration {
    pub(super) fn new(registry: Weak<Inner>, id: u64, events: mpsc::Receiver<Event>) -> Self {
        Self {
            registry,
            id,
            events,
        }
    }

    /// The connection's number on this instance.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event for this connection; `None` once the registry is gone.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Deregisters now, and waits until Redis has forgotten the connection (dropping the
    /// registration does the same in the background).
    pub async fn release(mut self) {
        if let Some((registry, entry)) = self.take_entry() {
            registry.remove_shared(vec![entry]).await;
        }
    }

    /// Removes the connection here; what Redis still needs to forget, if anything.
    fn take_entry(&mut self) -> Option<(Registry, (u64, Tenant, String))> {
        let registry = Registry {
            inner: self.registry.upgrade()?,
        };
        let local = registry.lock_local().remove(&self.id)?;
        metrics::gauge_add("turnstile_connections", -1.0);
        registry.inner.backend.as_ref()?;
        Some((registry, (self.id, local.tenant, local.user)))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some((registry, entry)) = self.take_entry() else {
            return;
        };
        // Outside a runtime (a process shutting down), the lease ends by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { registry.remove_shared(vec![entry]).await });
        }
    }
}
