//! The registry's background work: renewing this instance's leases, and reading its inbox.
//! Both tasks hold the registry weakly and are aborted with its last clone, so neither
//! outlives it.

use std::{
    collections::HashMap,
    sync::{Mutex, Weak, atomic::Ordering},
    time::Duration,
};

use redis::Value;
use tokio::{runtime::Handle, task::JoinHandle};

use super::{Registry, keys::renew_cmd, registry::Inner};
use crate::{sync::lock, tenant::Tenant, time::millis};

/// The registry's tasks: aborted when dropped, which is when the registry's last clone goes.
#[derive(Debug, Default)]
pub(super) struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    /// Starts the renewal (every `renew_every`) and the inbox reader (every `poll`) of
    /// `registry` on `runtime`.
    pub(super) fn start(
        &self,
        runtime: &Handle,
        registry: &Registry,
        renew_every: Duration,
        poll: Duration,
    ) {
        let weak = std::sync::Arc::downgrade(&registry.inner);
        let renew = runtime.spawn(renew_task(weak.clone(), renew_every));
        let inbox = runtime.spawn(inbox_task(weak, poll));
        lock(&self.0).extend([renew, inbox]);
    }
}

impl Tasks {
    /// Keeps `task` to abort it with the others.
    pub(super) fn keep(&self, task: JoinHandle<()>) {
        lock(&self.0).push(task);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in lock(&self.0).drain(..) {
            task.abort();
        }
    }
}

/// Renews the leases of this instance's connections, grouped by key: one script per user and
/// one per tenant.
async fn renew_task(registry: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = registry.upgrade() else {
            return;
        };
        let registry = Registry { inner };
        registry.renew().await;
    }
}

impl Registry {
    async fn renew(&self) {
        // A draining instance has left the registry; its last connections are closing.
        if self.inner.backend.is_none() || self.inner.draining.load(Ordering::Acquire) {
            return;
        }
        let mut users: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
        let mut tenants: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (id, c) in self.lock_local().iter() {
            let member = self.inner.keys.member(*id);
            users
                .entry(self.inner.keys.user(&c.tenant, &c.user))
                .or_default()
                .push((member.clone(), c.meta.clone()));
            tenants
                .entry(self.inner.keys.tenant(&c.tenant))
                .or_default()
                .push((member, String::new()));
        }
        let lease = millis(self.inner.lease);
        let mut commands: Vec<redis::Cmd> = users
            .into_iter()
            .map(|((live, meta), members)| renew_cmd(&[live, meta], lease, &members))
            .chain(
                tenants
                    .into_iter()
                    .map(|(key, members)| renew_cmd(&[key], lease, &members)),
            )
            .collect();
        // The inbox lives as long as the instance renews.
        let mut inbox = redis::cmd("PEXPIRE");
        inbox
            .arg(self.inner.keys.inbox(&self.inner.keys.instance))
            .arg(lease * 2);
        commands.push(inbox);
        if let Err(error) = self.run_all(commands).await {
            self.redis_failed("renew", &error);
        }
    }
}

/// Reads this instance's inbox and hands each message to the local connections it names.
async fn inbox_task(registry: Weak<Inner>, every: Duration) {
    let mut last = "0-0".to_owned();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = registry.upgrade() else {
            return;
        };
        let registry = Registry { inner };
        let Some(backend) = registry.inner.backend.clone() else {
            return;
        };
        let key = registry.inner.keys.inbox(&registry.inner.keys.instance);
        let from = last.clone();
        let read = backend
            .run(registry.inner.timeout, |mut conn| async move {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(from)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        let Ok(reply) = read else {
            continue;
        };
        for (id, fields) in stream_entries(reply) {
            last = id;
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            let Some(Ok(tenant)) = field("t").map(|t| Tenant::new(t)) else {
                continue;
            };
            match (field("u"), field("m"), field("e")) {
                (Some(user), Some(message), _) => {
                    registry.deliver_here(&tenant, user, message);
                }
                (user, None, Some(ended)) => {
                    registry.end_here(&tenant, user.map(String::as_str), ended);
                }
                _ => {}
            }
        }
    }
}

/// The entries of an `XREAD` reply for one stream: id and field pairs (RESP2 or RESP3).
pub(crate) fn stream_entries(reply: Value) -> Vec<(String, Vec<(String, String)>)> {
    crate::backend::stream::read_entries(reply)
}
