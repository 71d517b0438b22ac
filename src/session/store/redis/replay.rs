//! Taking back what a [`FallbackStore`](crate::session::FallbackStore) journaled while Redis
//! was unreachable: each write in one round trip, field by field, never over a newer write and
//! never bringing back a session Redis no longer has (see `lua/replay.lua`).

use std::{sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::Value;

use super::{
    RedisStore,
    layout::{TENANT, USER, patch_fields, record_fields},
};
use crate::{
    backend::{Batch, BreakerState, Part},
    script::without_comments,
    session::store::{
        JournaledWrite, Patch, Record, ReplayStore, Replayed, SessionKey, SessionStore, StoreError,
        UserKey,
    },
    time::unix_millis,
};

/// Sent as `EVAL` beside the user-index commands: a `NOSCRIPT` reply (after a Redis restart)
/// could not be retried without repeating the other commands of the request.
static REPLAY: LazyLock<String> =
    LazyLock::new(|| without_comments(include_str!("lua/replay.lua")));

/// How a journaled write is replayed; see `lua/replay.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The session was created (or moved to this key) during the outage: written if absent.
    Create,
    /// The session must still exist in Redis; one that is gone stays gone.
    Patch,
}

/// One journaled write, in the shape the replay script takes.
#[derive(Debug)]
struct Write<'a> {
    mode: Mode,
    /// When the write was made (Unix ms).
    at: u64,
    /// Fields written as they are when the hash is absent.
    base: Vec<String>,
    patch: &'a Patch,
    /// A user binding made by the write, compared by time like any field.
    user: Option<&'a str>,
    /// Index the session under this user, up to this absolute end.
    index: Option<(&'a str, u64)>,
}

/// An empty patch, for writes that bring whole records.
static NO_CHANGE: Patch = Patch {
    set: Vec::new(),
    remove: Vec::new(),
    lifetime: None,
};

impl<'a> Write<'a> {
    /// A session made during the outage: `base` written if the hash is absent, indexed under
    /// `index`.
    fn create(at: u64, base: Vec<String>, index: Option<(&'a str, u64)>) -> Self {
        Self {
            mode: Mode::Create,
            at,
            base,
            patch: &NO_CHANGE,
            user: None,
            index,
        }
    }

    /// Changed fields of a session that must still be in Redis.
    fn patch(at: u64, patch: &'a Patch) -> Self {
        Self {
            mode: Mode::Patch,
            at,
            base: Vec::new(),
            patch,
            user: None,
            index: None,
        }
    }
}

#[async_trait]
impl ReplayStore for RedisStore {
    fn is_unreachable(&self) -> bool {
        self.backend().status().state != BreakerState::Closed
    }

    async fn replay(&self, at: u64, write: &JournaledWrite) -> Result<Replayed, StoreError> {
        // Redis may have come back without its data: the copies go back first, so that the
        // journal's writes land on them.
        self.ensure_intact().await;
        self.replay_now(at, write).await
    }

    /// With a copy ([`with_local_copy`](RedisStore::with_local_copy) or
    /// [`with_restore_copy`](RedisStore::with_restore_copy)), on a server whose connection
    /// tracks what it reads.
    fn keeps_copy(&self) -> bool {
        RedisStore::keeps_copy(self)
    }

    fn copied(&self, key: &SessionKey) -> Option<Record> {
        RedisStore::keeps_copy(self)
            .then(|| self.copy().outage_copy(&self.keys.session(key)))
            .flatten()
    }

    fn copied_of_user(&self, user: &UserKey) -> Vec<(SessionKey, Record)> {
        if !RedisStore::keeps_copy(self) {
            return Vec::new();
        }
        let of_user = |record: &Record| record.user.as_deref() == Some(user.user());
        self.copy()
            .outage_copies(of_user)
            .into_iter()
            .filter_map(|(name, record)| {
                let key = self.keys.session_key_of(&name)?;
                (key.tenant() == user.tenant()).then_some((key, record))
            })
            .collect()
    }

    fn forget_copy(&self, key: &SessionKey) {
        if RedisStore::keeps_copy(self) {
            self.copy().forget(&self.keys.session(key));
        }
    }
}

impl RedisStore {
    /// [`ReplayStore::replay`], without the check for lost data (the write-back uses it).
    pub(super) async fn replay_now(
        &self,
        at: u64,
        write: &JournaledWrite,
    ) -> Result<Replayed, StoreError> {
        let applied = match write {
            JournaledWrite::Create { key, record } => {
                let index = record.user.as_deref().map(|u| (u, record.expires_at));
                let write = Write::create(at, record_fields(key, record), index);
                self.write(key, &write).await?
            }
            JournaledWrite::Update { key, patch } => {
                self.write(key, &Write::patch(at, patch)).await?
            }
            JournaledWrite::Cycle {
                old,
                old_user,
                new,
                change,
                user,
                user_changed,
                expires_at,
            } => {
                let write = Write {
                    patch: change,
                    user: user.as_deref().filter(|_| *user_changed),
                    ..Write::create(at, Vec::new(), user.as_deref().map(|u| (u, *expires_at)))
                };
                self.replay_move(old, old_user.as_deref(), new, write)
                    .await?
            }
            JournaledWrite::Delete { key, user } => {
                self.delete(key, user.as_deref()).await?;
                true
            }
            JournaledWrite::DeleteUser { user } => {
                self.delete_user_sessions_before(user, at).await?;
                true
            }
        };
        Ok(if applied {
            Replayed::Applied
        } else {
            Replayed::Superseded
        })
    }

    /// Replays a move to a new id: the old hash as it is in Redis now (write times included)
    /// is the base of the new one, `write`'s changes go over it by time, then the old id is
    /// removed. `false` when the session is gone.
    async fn replay_move(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        mut write: Write<'_>,
    ) -> Result<bool, StoreError> {
        let Some(base) = self.load_raw(old).await? else {
            // Gone from Redis: either this move was replayed already (the new key exists), or
            // the session was destroyed meanwhile and stays destroyed.
            return self.exists(new).await;
        };
        write.base = base;
        let moved = self.write(new, &write).await?;
        self.delete(old, old_user).await?;
        Ok(moved)
    }

    /// Every field of a live session's hash as it is (write times included), restarting its
    /// inactivity clock; `None` when there is no such live session.
    async fn load_raw(&self, key: &SessionKey) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self
            .fetch(key, &self.keys.session(key), true)
            .await?
            .into_fields()
            .map(|fields| fields.into_iter().flat_map(|(n, v)| [n, v]).collect()))
    }

    /// Whether `key` holds a session (a hash with metadata).
    async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HEXISTS").arg(self.keys.session(key)).arg(TENANT);
        let (found,): (i64,) = self.query(pipe).await?;
        Ok(found == 1)
    }

    /// Replays one journaled write in one round trip; `false` when the session is gone.
    async fn write(&self, key: &SessionKey, write: &Write<'_>) -> Result<bool, StoreError> {
        let (mut set, remove) = patch_fields(write.patch);
        if let Some(user) = write.user {
            set.push((USER.to_owned(), user.to_owned()));
        }
        let mut script = redis::cmd("EVAL");
        script
            .arg(REPLAY.as_str())
            .arg(1)
            .arg(self.keys.session(key))
            .arg(match write.mode {
                Mode::Create => "create",
                Mode::Patch => "patch",
            })
            .arg(write.at)
            .arg(write.base.len() / 2)
            .arg(set.len())
            .arg(remove.len())
            .arg(&write.base)
            .arg(
                set.iter()
                    .flat_map(|(name, value)| [name, value])
                    .collect::<Vec<_>>(),
            )
            .arg(remove);
        let mut part = Part::new();
        part.add(script);
        let mut batch = Batch::new();
        let applied = batch.push(part);
        if let Some((user, expires_at)) = write.index {
            let mut record = Record::new(Duration::ZERO, Duration::ZERO);
            record.user = Some(user.to_owned());
            record.expires_at = expires_at;
            batch.push(self.index_part(key, &record));
        }
        let replies = self.run(batch).await?;
        // A replayed change makes any copy this instance holds stale. (A session written
        // whole, when absent, is what the copy holds: a write-back keeps its copy.) A write
        // that failed changed nothing, and the copy stays.
        if write.mode == Mode::Patch {
            self.copy().forget(&self.keys.session(key));
        }
        Ok(matches!(replies.part(applied).first(), Some(Value::Int(1))))
    }

    /// Removes the sessions of `user` created at or before `at` (Unix ms): a "log out
    /// everywhere" made during an outage ends the sessions it could have seen, not the logins
    /// made after it. Returns how many were removed.
    async fn delete_user_sessions_before(
        &self,
        user: &UserKey,
        at: u64,
    ) -> Result<usize, StoreError> {
        let ended: Vec<SessionKey> = self
            .list_user_sessions(user)
            .await?
            .into_iter()
            .filter(|info| unix_millis(info.created_at) <= at)
            .map(|info| info.key)
            .collect();
        if ended.is_empty() {
            return Ok(0);
        }
        let members: Vec<String> = ended.iter().map(SessionKey::hash).collect();
        self.delete_sessions(user, &ended, &members).await
    }
}
