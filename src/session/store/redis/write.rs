//! Saving a session's changed fields: one transaction in one round trip, with the instance's
//! copy updated in place when it holds a current one.

use redis::{Cmd, Pipeline};

use super::{
    RedisStore,
    copy::{Writing, slide_due},
    layout::{self, ABSOLUTE, IDLE, TENANT, WRITTEN},
};
use crate::{
    session::store::{Patch, StoreError, Written},
    time::{millis, now_millis},
};

impl RedisStore {
    /// Saves `patch` to a session whose current copy this instance holds: it knows the session
    /// is live and its deadlines, so nothing is read first. One round trip, one transaction:
    /// the fields with their write times, the TTL when the inactivity expiry is due to restart
    /// (see `copy::slide_due`) or the expiry settings changed, and `HEXISTS` on the session's
    /// tenant field, which says whether the session still existed (a save to a session
    /// destroyed a moment ago leaves a hash without metadata, removed at once) and, being a
    /// read after the writes, keeps Redis telling this instance of other clients' changes.
    pub(super) async fn update_held(
        &self,
        redis_key: &str,
        patch: &Patch,
        writing: Writing,
    ) -> Result<Written, StoreError> {
        let now = self.copy().now();
        let lifetime = patch.lifetime.unwrap_or(writing.lifetime);
        let ttl = millis(lifetime.ttl_at(now));
        if ttl == 0 {
            // The change ends the session (or its absolute end has just passed).
            self.remove_dead(redis_key).await;
            return Ok(Written::Missing);
        }
        // The inactivity expiry restarts only when that is due, as on a read, or when the
        // patch changes the expiry settings; otherwise the key keeps the end it has.
        let slide = patch.lifetime.is_some() || slide_due(&lifetime, writing.expires, now);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for cmd in field_writes(redis_key, patch, now_millis()) {
            pipe.add_command(cmd).ignore();
        }
        if slide {
            pipe.cmd("PEXPIRE").arg(redis_key).arg(ttl).ignore();
        }
        pipe.cmd("HEXISTS").arg(redis_key).arg(TENANT);
        match self.query_hash::<(i64,)>(pipe).await? {
            Some((1,)) => {
                let expires = if slide {
                    now.saturating_add(ttl)
                } else {
                    writing.expires
                };
                writing.applied(patch, expires);
                Ok(Written::Applied)
            }
            // Gone before the write, or not a hash.
            _ => {
                self.remove_dead(redis_key).await;
                Ok(Written::Missing)
            }
        }
    }

    /// Saves `patch` to a session this instance holds no current copy of: one round trip,
    /// and a second only when the TTL sent was not the session's (see the type's docs).
    pub(super) async fn update_unheld(
        &self,
        redis_key: &str,
        patch: &Patch,
    ) -> Result<Written, StoreError> {
        let guess = patch
            .lifetime
            .map_or_else(|| self.idle_vote.guess(), |l| millis(l.inactivity_timeout));
        let pipe = update_pipeline(redis_key, patch, now_millis(), guess);
        type Reply = (i64, (Option<u64>, Option<u64>), (u64, u64));
        let reply = self.query_hash::<Reply>(pipe).await?;
        // This instance's own write raises no invalidation: a copy it keeps (made by a read
        // before the write landed, too) would go stale. A write that failed changed nothing,
        // and the copy stays what a write-back after a loss of Redis's data would use.
        self.copy().forget(redis_key);
        let ttl = match reply {
            // Gone before the write: what it left vanishes by itself.
            Some((0, _, _)) => return Ok(Written::Missing),
            Some((_, (Some(abs), Some(idle)), (seconds, micros))) => {
                abs.saturating_sub(seconds * 1000 + micros / 1000).min(idle)
            }
            // Not a session: no metadata, or not a hash.
            _ => 0,
        };
        if ttl == 0 {
            // Ended by the write (or just now by its absolute end), or corrupted.
            self.remove_dead(redis_key).await;
            return Ok(Written::Missing);
        }
        self.set_ttl(redis_key, ttl, guess).await;
        Ok(Written::Applied)
    }
}

/// The commands that write `patch`'s fields, each with its write time `written` (the
/// writer's clock; see `lua/replay.lua`): an `HSET`, and an `HDEL` when keys are removed.
fn field_writes(redis_key: &str, patch: &Patch, written: u64) -> Vec<Cmd> {
    let (set, remove) = layout::patch_fields(patch);
    let mut cmds = Vec::with_capacity(2);
    if !set.is_empty() || !remove.is_empty() {
        let mut hset = redis::cmd("HSET");
        hset.arg(redis_key);
        // Each field's write-time field, `t:<field>`, named in one buffer: `arg` copies it.
        let mut time_field = String::from(WRITTEN);
        for (name, value) in &set {
            time_field.truncate(WRITTEN.len());
            time_field.push_str(name);
            hset.arg(name).arg(value).arg(&time_field).arg(written);
        }
        for name in &remove {
            time_field.truncate(WRITTEN.len());
            time_field.push_str(name);
            hset.arg(&time_field).arg(written);
        }
        cmds.push(hset);
    }
    if !remove.is_empty() {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(redis_key).arg(&remove);
        cmds.push(hdel);
    }
    cmds
}

/// The transaction of a save without a copy: whether the session existed (a session is a
/// hash with metadata), the changed fields with their write time `written`, the TTL `guess`,
/// and what the TTL must really be (the absolute end and timeout, and Redis's time).
///
/// Without a script the write cannot be made conditional: on a session that is gone it
/// leaves a hash without metadata and without a TTL (every session has one). That hash is
/// never served as a session, and the second `PEXPIRE` (NX: only a key without a TTL) makes
/// it vanish within a millisecond.
fn update_pipeline(redis_key: &str, patch: &Patch, written: u64, guess: u64) -> Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("HEXISTS").arg(redis_key).arg(TENANT);
    for cmd in field_writes(redis_key, patch, written) {
        pipe.add_command(cmd).ignore();
    }
    pipe.cmd("HMGET").arg(redis_key).arg(ABSOLUTE).arg(IDLE);
    pipe.cmd("PEXPIRE")
        .arg(redis_key)
        .arg(guess)
        .arg("XX")
        .ignore();
    pipe.cmd("PEXPIRE").arg(redis_key).arg(1).arg("NX").ignore();
    pipe.cmd("TIME");
    pipe
}
