//! Reaching connections: listing and counting them across instances, and delivering messages
//! to every connection of a user, here at once and elsewhere through the other instances'
//! inboxes.

use std::collections::HashMap;

use crate::time::millis;

use super::{
    ConnectionInfo, Event, Registry,
    keys::{LIVE, parse_member},
};
use crate::tenant::Tenant;

impl Registry {
    /// The live connections of `user` in `tenant`, on every instance (this instance's alone
    /// while Redis is down).
    pub async fn connections_of(&self, tenant: &Tenant, user: &str) -> Vec<ConnectionInfo> {
        match self.shared_connections_of(tenant, user).await {
            Some(list) => list,
            None => self.local_connections_of(tenant, user),
        }
    }

    /// How many live connections `tenant` has on every instance (this instance's while Redis
    /// is down).
    pub async fn count(&self, tenant: &Tenant) -> usize {
        if let Some(backend) = &self.inner.backend {
            let call = LIVE.key(self.inner.keys.tenant(tenant));
            let listed = backend
                .run(self.inner.timeout, |mut conn| async move {
                    let (members, _): (Vec<String>, Vec<Option<String>>) =
                        call.invoke_async(&mut conn).await?;
                    Ok(members.len())
                })
                .await;
            match listed {
                Ok(count) => return count,
                Err(error) => self.redis_failed("count", &error),
            }
        }
        self.lock_local()
            .values()
            .filter(|c| c.tenant == *tenant)
            .count()
    }

    /// Sends `message` to every live connection of `user` in `tenant`, on every instance; this
    /// instance's connections get it at once. Returns how many connections it was sent to.
    /// While Redis is down, only this instance's connections are reached.
    pub async fn send_to_user(&self, tenant: &Tenant, user: &str, message: &str) -> usize {
        let reached_here = self.deliver_here(tenant, user, message);
        let Some(listed) = self.shared_connections_of(tenant, user).await else {
            return reached_here;
        };
        let mut elsewhere: HashMap<String, usize> = HashMap::new();
        for connection in listed {
            if connection.instance != self.inner.keys.instance {
                *elsewhere.entry(connection.instance).or_default() += 1;
            }
        }
        if elsewhere.is_empty() {
            return reached_here;
        }
        let fields = [("t", tenant.as_str()), ("u", user), ("m", message)];
        let commands = self.inbox_commands(elsewhere.keys(), &fields);
        match self.run_all(commands).await {
            Ok(()) => reached_here + elsewhere.values().sum::<usize>(),
            Err(error) => {
                self.redis_failed("send", &error);
                reached_here
            }
        }
    }

    /// The commands that append an entry of `fields` to the inbox of each of `instances`.
    pub(super) fn inbox_commands<'a>(
        &self,
        instances: impl Iterator<Item = &'a String>,
        fields: &[(&str, &str)],
    ) -> Vec<redis::Cmd> {
        let lease = millis(self.inner.lease);
        instances
            .flat_map(|instance| {
                let inbox = self.inner.keys.inbox(instance);
                // An inbox its instance no longer renews (it died) expires all the same.
                let mut expire = redis::cmd("PEXPIRE");
                expire.arg(&inbox).arg(lease * 2);
                let mut cmd = redis::cmd("XADD");
                cmd.arg(inbox).arg("MAXLEN").arg("~").arg(10_000).arg("*");
                for (name, value) in fields {
                    cmd.arg(*name).arg(*value);
                }
                [cmd, expire]
            })
            .collect()
    }

    fn local_connections_of(&self, tenant: &Tenant, user: &str) -> Vec<ConnectionInfo> {
        self.lock_local()
            .iter()
            .filter(|(_, c)| c.tenant == *tenant && c.user == user)
            .map(|(id, c)| ConnectionInfo {
                instance: self.inner.keys.instance.clone(),
                id: *id,
                meta: c.meta.clone(),
            })
            .collect()
    }

    pub(super) async fn shared_connections_of(
        &self,
        tenant: &Tenant,
        user: &str,
    ) -> Option<Vec<ConnectionInfo>> {
        let backend = self.inner.backend.as_ref()?;
        let (live, meta) = self.inner.keys.user(tenant, user);
        let mut call = LIVE.key(live);
        call.key(meta);
        let listed = backend
            .run(self.inner.timeout, |mut conn| async move {
                let (members, metas): (Vec<String>, Vec<Option<String>>) =
                    call.invoke_async(&mut conn).await?;
                Ok((members, metas))
            })
            .await;
        match listed {
            Ok((members, metas)) => Some(
                members
                    .into_iter()
                    .zip(metas.into_iter().chain(std::iter::repeat(None)))
                    .filter_map(|(member, meta)| {
                        let (instance, id) = parse_member(&member)?;
                        Some(ConnectionInfo {
                            instance: instance.to_owned(),
                            id,
                            meta: meta.unwrap_or_default(),
                        })
                    })
                    .collect(),
            ),
            Err(error) => {
                self.redis_failed("list", &error);
                None
            }
        }
    }

    pub(super) fn deliver_here(&self, tenant: &Tenant, user: &str, message: &str) -> usize {
        let local = self.lock_local();
        let mut reached = 0;
        for connection in local.values() {
            if connection.tenant == *tenant && connection.user == user {
                // A connection too slow to keep up loses the message rather than holding
                // up the sender.
                if connection
                    .inbox
                    .try_send(Event::Message(message.to_owned()))
                    .is_ok()
                {
                    reached += 1;
                }
            }
        }
        reached
    }
}
