//! Saving a session's changed fields: one transaction in one round trip, with the instance's
//! copy updated in place when it holds a current one.

use redis::{Cmd, Pipeline, Value};

use super::{
    RedisStore,
    copy::{Writing, slide_due},
    layout::{self, ABSOLUTE, DATA, FieldValue, IDLE, TENANT, WRITTEN},
    sized,
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
        // No reply is ignored: the pipeline's set of ignored replies would cost an allocation.
        // The last reply is the `HEXISTS`.
        let mut pipe = Pipeline::with_capacity(4);
        pipe.atomic();
        for cmd in field_writes(redis_key, patch, now_millis()) {
            pipe.add_command(cmd);
        }
        if slide {
            pipe.cmd("PEXPIRE").arg(redis_key).arg(ttl);
        }
        pipe.add_command(sized(&["HEXISTS", redis_key, TENANT]));
        let replies = self.query_hash::<Vec<Value>>(pipe).await?;
        match replies.as_deref().and_then(<[Value]>::last) {
            Some(Value::Int(1)) => {
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
///
/// Every save sends them, so they are written straight from the patch: the `HSET` is sized
/// first and allocates once, and the field names share one buffer.
fn field_writes(redis_key: &str, patch: &Patch, written: u64) -> impl Iterator<Item = Cmd> {
    let hset = (!patch.set.is_empty() || !patch.remove.is_empty() || patch.lifetime.is_some())
        .then(|| {
            let (args, bytes, widest) = hset_size(redis_key, patch);
            let mut hset = Cmd::with_capacity(args, bytes);
            hset.arg("HSET").arg(redis_key);
            // `t:<field>`, whose tail is the field's own name: `arg` copies what it is given.
            let mut name = String::with_capacity(WRITTEN.len() + widest);
            for field in layout::patch_sets(patch) {
                let time = time_field(&mut name, field.prefix, field.name);
                hset.arg(&time[WRITTEN.len()..]);
                match field.value {
                    FieldValue::Text(text) => hset.arg(text),
                    FieldValue::Number(number) => hset.arg(number),
                };
                hset.arg(time).arg(written);
            }
            for removed in &patch.remove {
                hset.arg(time_field(&mut name, DATA, removed)).arg(written);
            }
            hset
        });
    let hdel = (!patch.remove.is_empty()).then(|| {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(redis_key);
        for removed in &patch.remove {
            hdel.arg(format!("{DATA}{removed}"));
        }
        hdel
    });
    hset.into_iter().chain(hdel)
}

/// `t:<prefix><field>`, written into `name`.
fn time_field<'a>(name: &'a mut String, prefix: &str, field: &str) -> &'a str {
    name.clear();
    name.push_str(WRITTEN);
    name.push_str(prefix);
    name.push_str(field);
    name
}

/// The size of `patch`'s `HSET`: its arguments, their bytes at most, and its longest field
/// name.
fn hset_size(redis_key: &str, patch: &Patch) -> (usize, usize, usize) {
    // The widest a number gets in decimal (`u64::MAX`).
    const NUMBER: usize = 20;
    let mut args = 2;
    let mut bytes = "HSET".len() + redis_key.len();
    let mut widest = 0;
    for field in layout::patch_sets(patch) {
        let name = field.prefix.len() + field.name.len();
        let value = match field.value {
            FieldValue::Text(text) => text.len(),
            FieldValue::Number(_) => NUMBER,
        };
        args += 4;
        bytes += 2 * name + WRITTEN.len() + value + NUMBER;
        widest = widest.max(name);
    }
    for name in &patch.remove {
        args += 2;
        bytes += WRITTEN.len() + DATA.len() + name.len() + NUMBER;
        widest = widest.max(DATA.len() + name.len());
    }
    (args, bytes, widest)
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
