//! Sessions in Redis: one hash per session, a set per user indexing their sessions.
//!
//! - `layout`: key and field names, and how a record is encoded into a hash and decoded from it.
//! - `copy`: the instance's coherent copy of the sessions it served.
//! - `read`: a load, from the copy or from Redis, and the slide of the inactivity expiry.
//! - `write`: a save of the changed fields, with or without a copy.
//! - `ttl`: the TTL a save without a copy sends before it knows the session's own timeout.
//! - `replay`: taking back the writes a `FallbackStore` journaled during an outage.
//!
//! Every operation is written once: the parts of one that touch keys of different hash slots
//! (a session and its user's index) go as one pipeline on a server and as one request per slot
//! on a cluster (see `backend::Batch`).

mod copy;
mod layout;
mod read;
mod replay;
mod restore;
mod ttl;
mod users;
mod write;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use async_trait::async_trait;
use redis::{Cmd, FromRedisValue, Pipeline, Value};

pub use self::copy::LocalCopyStats;
#[cfg(fuzzing)]
pub(crate) use self::layout::{hash_fields, parse_record, record_fields};
use self::{
    copy::{Fill, LocalCopy},
    layout::{Keys, TENANT},
    read::Fetched,
    ttl::IdleVote,
};
use super::{
    LoginHold, Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written,
};
use crate::{
    backend::{Batch, Part, RedisBackend, Replies, fails_the_call},
    time::millis,
};

/// Sessions in Redis, shared by every instance that uses the same Redis.
///
/// Each session is one Redis hash (a field per session key, plus metadata fields) whose TTL
/// does the cleanup; each user has a set indexing their sessions, so they can be listed and
/// revoked from any instance. Keys are `{prefix}{tenant}:session:{hash of id}` and
/// `{prefix}{tenant}:user:{hash of user id}`.
///
/// # The local copy
///
/// Off by default. Turned on ([`RedisStore::with_local_copy`]), each instance keeps a bounded
/// copy of the decoded records of the sessions it served, and Redis keeps it coherent: the
/// connection speaks RESP3, and the first read or whole-session write on each connection is
/// preceded on it by `CLIENT TRACKING ON NOLOOP`, so Redis pushes an invalidation as soon as
/// any other client changes (or expires, or evicts) a session this instance read. While a
/// copy is current, a load is served from it: no round trip, no parsing, and a save is one
/// round trip with nothing read first. A copy that another client's change invalidated is
/// dead and never served again. These take every copy out of service (the next read of each
/// goes to Redis and confirms or replaces it): a lost connection or a reconnect, an outage,
/// a Sentinel failover, and the null invalidation of `FLUSHALL`/`FLUSHDB`. A copy is also
/// served only while the connection has answered within the last second (the backend pings
/// a quiet connection), so a partitioned socket that has not noticed it is dead stops
/// serving copies within a second.
///
/// **What it trades.** Without the copy, a change acknowledged by one instance is what every
/// instance serves next. With it, another instance serves the change once its connection has
/// carried Redis's push, not at once: Redis sends the push as it runs the change, but the
/// instance that holds the copy handles it when its runtime gets to it, and a client fast
/// enough to ask that instance in between is served the previous value. `BENCHMARKS.md`
/// measures that window (tens of microseconds at the median) and how often a read right after
/// a write on another instance saw the previous value. Turn the copy on when a load balancer
/// keeps each client on one instance (sticky sessions), or when a session read a moment late
/// on another instance is acceptable; leave it off when a logout on one instance must be a
/// `401` on every other in the very next request.
///
/// Stores on one backend with one key prefix share one copy. Not on a Redis Cluster yet:
/// there every load goes to Redis (the cluster client routes the `CLIENT TRACKING` a read
/// sends first by a key it does not have).
///
/// # When Redis comes back empty
///
/// A store with a copy ([`RedisStore::with_local_copy`], or [`RedisStore::with_restore_copy`]
/// to keep one that is never served) writes its copies back when Redis lost its data. The
/// backend keeps a marker key (`turnstile:marker`, no TTL); after each reconnect the store's
/// first call reads it (one round trip; every call waits for it), and when it is gone or was
/// replaced by another instance, the store writes back every copy Redis confirmed since the
/// last check that found the marker: only where Redis holds nothing under the key, with the
/// user-index entry, and with the time it was confirmed as its fields' write time, so that
/// writes journaled meanwhile ([`FallbackStore`](crate::session::FallbackStore)) land on
/// top. A session destroyed before the loss stays destroyed (its copy died with the
/// invalidation); a `FLUSHALL` kills every copy and is not undone. Sessions no instance held
/// (created or logged in and not read since) are lost, and a restored session's inactivity
/// timeout restarts at the write-back.
///
/// # Round trips
///
/// - A load: one (`TIME`, `HGETALL`, `PTTL`, pipelined); none for a session the instance
///   holds a current copy of.
/// - The inactivity expiry is restarted in Redis only when that is due: once more than a
///   sixteenth of the inactivity timeout has passed since it was last restarted (every write,
///   an expiry included, invalidates the other instances' copies). That costs a load one more
///   round trip (`PEXPIRE` then `PTTL`, in one transaction) a few times per timeout. A session
///   can therefore end up to a sixteenth of its inactivity timeout earlier than its last use
///   plus the timeout. Deadlines are checked locally, from the record, on Redis's clock (the
///   offset measured from each `TIME`).
/// - A save with a current copy: one transaction in one round trip, nothing read first:
///   `HSET` (the changed fields and their write times; plus `HDEL` for removed keys),
///   `PEXPIRE` only when the inactivity expiry is due to restart or the expiry settings
///   changed, and `HEXISTS`, which says whether the session still existed and keeps Redis
///   telling this instance of changes. The copy is updated in place. Without a copy, one
///   round trip (a second when the session's own inactivity timeout is not the one most
///   sessions have, which the first had to assume). None when nothing changed.
/// - A new session is one; a login (`set_user`, which moves the session to a new id) is one
///   after the load.
///
/// No Lua runs on these paths: a script costs Redis several times the commands it sequences.
///
/// On a Redis Cluster ([`RedisBackend::cluster`]) a session and its user's index hash to
/// different slots, so the parts of an operation that touch both are sent as separate
/// pipelines at the same time: a login then takes two round trips after the read (the new
/// record and the index, then the old record's removal), and is no longer one transaction.
///
/// Requires Redis 7.0 or newer.
///
/// ```no_run
/// use tower_turnstile::{backend::RedisBackend, session::{RedisStore, SessionLayer}};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// let layer = SessionLayer::new(RedisStore::new(redis).with_key_prefix("myapp:"));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisStore {
    backend: RedisBackend,
    keys: Keys,
    timeout: Duration,
    /// The inactivity timeout most sessions seen lately have had; shared by clones, so every
    /// clone's reads inform the guess (see `ttl`).
    idle_vote: Arc<IdleVote>,
    /// How many sessions the instance's copy holds at most; 0 for none.
    capacity: u64,
    /// Whether reads are served from the copy, or it is kept only to be written back.
    serve: bool,
    /// The instance's copy of the sessions under this store's prefix, shared by every store on
    /// the backend with that prefix; found on first use.
    copy: OnceLock<Arc<LocalCopy>>,
}

impl RedisStore {
    /// A capacity for [`RedisStore::with_local_copy`] that suits most services: 100 000
    /// sessions, a few tens of MiB for typical records.
    pub const SUGGESTED_COPY_CAPACITY: u64 = 100_000;

    /// A store on `backend`, with key prefix `turnstile:`, a 250 ms deadline per round trip,
    /// and no local copy.
    pub fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            keys: Keys::new("turnstile:"),
            timeout: Duration::from_millis(250),
            idle_vote: Arc::default(),
            capacity: 0,
            serve: false,
            copy: OnceLock::new(),
        }
    }

    /// The prefix of every key this store writes. Default: `turnstile:`.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.keys = Keys::new(prefix);
        self.copy = OnceLock::new();
        self
    }

    /// Keeps a coherent local copy of up to `capacity` sessions on this instance (see "The
    /// local copy" above for what it trades); `0`, the default, keeps none, and every read goes
    /// to Redis. [`RedisStore::SUGGESTED_COPY_CAPACITY`] suits most services.
    ///
    /// Stores on one backend with one key prefix share one copy; the first to use it sets its
    /// capacity.
    ///
    /// ```no_run
    /// use tower_turnstile::{backend::RedisBackend, session::RedisStore};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Behind a load balancer with sticky sessions: reads of a held session skip Redis.
    /// let store = RedisStore::new(RedisBackend::new("redis://127.0.0.1:6379")?)
    ///     .with_local_copy(RedisStore::SUGGESTED_COPY_CAPACITY);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_local_copy(mut self, capacity: u64) -> Self {
        self.capacity = capacity;
        self.serve = true;
        self.copy = OnceLock::new();
        self
    }

    /// Keeps the same coherent copy of up to `capacity` sessions as
    /// [`with_local_copy`](Self::with_local_copy), but never serves a read from it: every read
    /// goes to Redis, so a write on another instance is seen at once. The copy is what the
    /// store writes back when Redis comes back without its data (see "When Redis comes back
    /// empty" in the type's docs). `0` keeps none.
    ///
    /// ```no_run
    /// use tower_turnstile::{backend::RedisBackend, session::RedisStore};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Behind any load balancer: reads from Redis, and sessions survive a Redis that
    /// // restarts without persistence.
    /// let store = RedisStore::new(RedisBackend::new("redis://127.0.0.1:6379")?)
    ///     .with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_restore_copy(mut self, capacity: u64) -> Self {
        self.capacity = capacity;
        self.serve = false;
        self.copy = OnceLock::new();
        self
    }

    /// What the instance's local copy has done so far: reads served from it and sent to
    /// Redis, copies dropped by other clients' changes.
    pub fn local_copy_stats(&self) -> LocalCopyStats {
        self.copy().stats()
    }

    /// The deadline of one round trip; past it the call fails as an outage. Default: 250 ms.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The backend this store uses.
    pub fn backend(&self) -> &RedisBackend {
        &self.backend
    }

    /// The prefix of every key this store writes.
    pub fn key_prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// The instance's copy of this store's sessions.
    fn copy(&self) -> &LocalCopy {
        self.copy.get_or_init(|| {
            let tracking = self.backend.tracking();
            tracking.keeper(self.keys.prefix(), || {
                LocalCopy::new(Arc::clone(tracking), self.capacity)
            })
        })
    }

    /// Whether the store keeps a copy: it fills it on reads, updates it on writes, and writes
    /// it back when Redis lost its data. Not on a cluster: its client routes the
    /// `CLIENT TRACKING` a read sends first by a key it does not have.
    fn keeps_copy(&self) -> bool {
        self.capacity > 0 && !self.backend.is_cluster() && self.copy().usable()
    }

    /// Whether reads of a held session are served from the copy.
    fn serves_copy(&self) -> bool {
        self.serve && self.keeps_copy()
    }

    /// The part that writes `record`'s hash under `key`, with its TTL, as one transaction: the
    /// inactivity timeout, cut short by the absolute end (`PEXPIREAT … LT`, on Redis's clock;
    /// an end already past removes the hash at once).
    fn record_part(&self, key: &SessionKey, record: &Record) -> Part {
        let redis_key = self.keys.session(key);
        let mut part = Part::atomic();
        part.cmd("HSET")
            .arg(&redis_key)
            .arg(layout::record_fields(key, record));
        part.cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(millis(record.inactivity_timeout).max(1));
        part.cmd("PEXPIREAT")
            .arg(&redis_key)
            .arg(record.expires_at)
            .arg("LT");
        self.idle_vote.vote(millis(record.inactivity_timeout));
        part
    }

    /// [`record_part`](Self::record_part), and when the instance keeps a copy and its
    /// connection tracks what it reads, the read of the key's TTL that makes Redis tell the
    /// instance of later changes, with the fill it completes.
    fn written_part(&self, key: &SessionKey, record: &Record) -> (Part, Option<Fill>) {
        let mut part = self.record_part(key, record);
        let redis_key = self.keys.session(key);
        let fill = self
            .keeps_copy()
            .then(|| self.copy().fill_written(&redis_key))
            .flatten();
        if fill.is_some() {
            part.cmd("PTTL").arg(&redis_key);
        }
        (part, fill)
    }

    /// The copy of a session just written whole holds it, until the TTL its write read.
    fn hold_written(&self, fill: Option<Fill>, record: &Record, replies: &[Value]) {
        if let (Some(fill), Some(Value::Int(pttl))) = (fill, replies.last()) {
            let pttl = u64::try_from(*pttl).unwrap_or(0);
            fill.hold(record, self.copy().now().saturating_add(pttl));
        }
    }

    /// The part that indexes `key` under the record's user; empty when it has none.
    fn index_part(&self, key: &SessionKey, record: &Record) -> Part {
        let mut part = Part::new();
        if let Some(user) = &record.user {
            let index = self.keys.user(&UserKey::new(key.tenant(), user.as_str()));
            part.cmd("SADD").arg(&index).arg(key.hash());
            // The index lives as long as its longest-lived session: NX gives a new index a
            // TTL, GT only ever extends it.
            part.cmd("PEXPIREAT")
                .arg(&index)
                .arg(record.expires_at)
                .arg("NX");
            part.cmd("PEXPIREAT")
                .arg(&index)
                .arg(record.expires_at)
                .arg("GT");
        }
        part
    }

    /// Adds to `part` the command that removes `key` from `user`'s index.
    fn unindex(&self, part: &mut Part, key: &SessionKey, user: &str) {
        part.cmd("SREM")
            .arg(self.keys.user(&UserKey::new(key.tenant(), user)))
            .arg(key.hash());
    }

    /// The part that marks `key` ended in `user`'s logins, if the cap ranks it there (a key of
    /// its own hash slot; see `users.rs`).
    fn unrank(&self, key: &SessionKey, user: &str) -> Part {
        let mut part = Part::new();
        part.cmd("ZADD")
            .arg(self.keys.logins(&UserKey::new(key.tenant(), user)))
            .arg("XX")
            .arg(users::ended_mark())
            .arg(key.hash());
        part
    }

    /// One pipeline, one round trip.
    async fn query<T: FromRedisValue + Send + 'static>(
        &self,
        pipe: Pipeline,
    ) -> Result<T, StoreError> {
        self.backend
            .query_pipeline(self.timeout, pipe)
            .await
            .map_err(StoreError::from)
    }

    /// A batch: one round trip on a server, one per part on a cluster.
    async fn run(&self, batch: Batch) -> Result<Replies, StoreError> {
        self.backend
            .run_batch(self.timeout, batch)
            .await
            .map_err(StoreError::from)
    }

    /// Runs `pipe`, answering `None` when Redis refuses one of its commands because the key
    /// holds something that is not a hash (`WRONGTYPE`): a corrupted record, not an outage.
    async fn query_hash<T: FromRedisValue + Send + 'static>(
        &self,
        mut pipe: Pipeline,
    ) -> Result<Option<T>, StoreError> {
        pipe.ignore_errors();
        self.backend
            .run(self.timeout, |mut conn| async move {
                let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
                // A server that cannot serve the call now (it became a replica in a failover,
                // lost its master, is loading, out of memory...) fails the call: an outage or
                // a refused write, never a bad record.
                let unavailable = replies.iter().find_map(|reply| match reply {
                    Value::ServerError(error) => {
                        let error = redis::RedisError::from(error.clone());
                        fails_the_call(&error).then_some(error)
                    }
                    _ => None,
                });
                if let Some(error) = unavailable {
                    return Err(error);
                }
                let wrong_type = |reply: &Value| {
                    matches!(reply, Value::ServerError(error) if error.code() == "WRONGTYPE")
                };
                if replies.iter().any(wrong_type) {
                    return Ok(None);
                }
                Ok(Some(redis::from_redis_value(Value::Array(replies))?))
            })
            .await
            .map_err(StoreError::from)
    }

    /// Corrects the TTL sent as `guess` with a read or write to the session's own `ttl`.
    async fn set_ttl(&self, redis_key: &str, ttl: u64, guess: u64) {
        if ttl == guess {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PEXPIRE").arg(redis_key).arg(ttl).ignore();
        if let Err(error) = self.query::<()>(pipe).await {
            // The read or write itself succeeded; the session keeps the TTL sent with it
            // until its next use.
            tracing::warn!(
                target: "tower_turnstile::session",
                %error,
                "could not set a session's TTL to its own inactivity timeout"
            );
        }
    }

    /// Removes a hash that is no live session (past its absolute end, or corrupted). Best
    /// effort: such a hash is never served.
    async fn remove_dead(&self, redis_key: &str) {
        self.copy().forget(redis_key);
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(redis_key).ignore();
        let _ = self.query::<()>(pipe).await;
    }
}

/// A command of text arguments, allocated for once (`redis::cmd` grows its buffers as
/// arguments come).
pub(super) fn sized(args: &[&str]) -> Cmd {
    let mut cmd = Cmd::with_capacity(args.len(), args.iter().map(|arg| arg.len()).sum());
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        self.ensure_intact().await;
        let redis_key = self.keys.session(key);
        if let Some(held) = self.held(&redis_key).await {
            return held;
        }
        let problem = match self.fetch(key, &redis_key, false).await? {
            Fetched::Missing => return Ok(None),
            Fetched::Live { record, .. } => return Ok(Some(record)),
            Fetched::Corrupt(problem) => problem,
        };
        tracing::warn!(
            target: "tower_turnstile::session",
            session = %key.hash(),
            %problem,
            "corrupted session record in Redis; treated as no session and removed"
        );
        // Best effort: the record is unusable whether or not the delete lands.
        self.remove_dead(&redis_key).await;
        Ok(None)
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        self.ensure_intact().await;
        self.ensure_tracking().await;
        // One transaction on a server. On a cluster the record and the index are two requests
        // at once, and a record must never be left out of its user's index (it could not be
        // revoked), so when either part fails the record is removed again.
        let mut batch = Batch::new();
        let (part, fill) = self.written_part(key, record);
        let written = batch.push(part);
        batch.push(self.index_part(key, record));
        let split = self.backend.splits(&batch);
        match self.run(batch).await {
            Ok(replies) => {
                self.hold_written(fill, record, replies.part(written));
                Ok(())
            }
            Err(error) => {
                if split {
                    self.remove_dead(&self.keys.session(key)).await;
                }
                Err(error)
            }
        }
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        self.ensure_intact().await;
        let redis_key = self.keys.session(key);
        match self.keeps_copy().then(|| self.copy().writing(&redis_key)) {
            Some(Some(writing)) => self.update_held(&redis_key, patch, writing).await,
            _ => self.update_unheld(&redis_key, patch).await,
        }
    }

    /// The new record and its index first, then the old record's removal, which says whether
    /// it was still live: one transaction on a server; on a cluster two round trips, and a
    /// failure between them leaves the old id valid until its own expiry (the new record is
    /// removed again). An old session destroyed meanwhile takes the new one with it.
    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        self.ensure_intact().await;
        self.ensure_tracking().await;
        let mut batch = Batch::new();
        let (part, fill) = self.written_part(new, record);
        let written = batch.push(part);
        let mut index = self.index_part(new, record);
        let mut other_index = Part::new();
        if let Some(old_user) = old_user {
            let to = if record.user.as_deref() == Some(old_user) {
                &mut index
            } else {
                &mut other_index
            };
            self.unindex(to, old, old_user);
            batch.push(self.unrank(old, old_user));
        }
        batch.push(index);
        batch.push(other_index);
        batch.then();
        self.copy().forget(&self.keys.session(old));
        let mut retire = Part::atomic();
        retire
            .cmd("HEXISTS")
            .arg(self.keys.session(old))
            .arg(TENANT);
        retire.cmd("DEL").arg(self.keys.session(old));
        let retired = batch.push(retire);
        let split = self.backend.splits(&batch);
        let replies = match self.run(batch).await {
            Ok(replies) => replies,
            Err(error) => {
                if split {
                    self.remove_dead(&self.keys.session(new)).await;
                }
                return Err(error);
            }
        };
        if matches!(replies.part(retired).first(), Some(Value::Int(1))) {
            self.hold_written(fill, record, replies.part(written));
            return Ok(Written::Applied);
        }
        // The old session was destroyed meanwhile (say, by "log out everywhere"): the copy
        // must not outlive it.
        self.delete(new, record.user.as_deref()).await?;
        Ok(Written::Missing)
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        self.ensure_intact().await;
        // This instance's own removal raises no invalidation here.
        self.copy().forget(&self.keys.session(key));
        let mut batch = Batch::new();
        let mut record = Part::new();
        record.cmd("DEL").arg(self.keys.session(key));
        batch.push(record);
        let mut index = Part::new();
        if let Some(user) = user {
            self.unindex(&mut index, key, user);
            batch.push(self.unrank(key, user));
        }
        batch.push(index);
        self.run(batch).await.map(drop)
    }

    /// One `HEXISTS` of the session's metadata: its inactivity clock is not restarted.
    async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.ensure_intact().await;
        let mut cmd = redis::cmd("HEXISTS");
        cmd.arg(self.keys.session(key)).arg(layout::TENANT);
        let found = self.backend.query::<bool>(self.timeout, cmd).await?;
        Ok(found)
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        self.ensure_intact().await;
        self.user_sessions(user).await
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        self.ensure_intact().await;
        self.end_user_sessions(user).await
    }

    /// Atomic: see `users.rs` and `lua/cap.lua`.
    async fn sessions_over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
        held: Option<&str>,
    ) -> Result<Vec<SessionKey>, StoreError> {
        self.ensure_intact().await;
        self.over_cap(user, login, max, held).await
    }

    /// Atomic, holding a place named `p:` and a random hash: see `users.rs`.
    async fn hold_login(
        &self,
        user: &UserKey,
        login: Option<&SessionKey>,
        max: usize,
    ) -> Result<LoginHold, StoreError> {
        self.ensure_intact().await;
        let place = users::place_name(user);
        Ok(if self.hold(user, login, max, &place).await? {
            LoginHold::Admitted(Some(place))
        } else {
            LoginHold::Refused
        })
    }
}
