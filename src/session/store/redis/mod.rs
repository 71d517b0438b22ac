//! Sessions in Redis: one hash per session, a set per user indexing their sessions.
//!
//! - `layout`: key and field names, and how a record is encoded into a hash and decoded from it.
//! - `ttl`: the TTL a read or save sends before it knows the session's own timeout.
//! - `replay`: taking back the writes a `FallbackStore` journaled during an outage.
//!
//! Every operation is written once: the parts of one that touch keys of different hash slots
//! (a session and its user's index) go as one pipeline on a server and as one request per slot
//! on a cluster (see `backend::Batch`).

mod layout;
mod replay;
mod ttl;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use redis::{FromRedisValue, Pipeline, Value};

use self::{
    layout::{ABSOLUTE, CREATED, Corrupt, IDLE, Keys, TENANT, USER, WRITTEN},
    ttl::IdleVote,
};
use super::{Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written};
use crate::{
    backend::{Batch, Part, RedisBackend, Replies},
    time::{from_unix_millis, millis, now_millis},
};

/// Sessions in Redis, shared by every instance that uses the same Redis.
///
/// Each session is one Redis hash (a field per session key, plus metadata fields) whose TTL
/// does the cleanup; each user has a set indexing their sessions, so they can be listed and
/// revoked from any instance. Keys are `{prefix}{tenant}:session:{hash of id}` and
/// `{prefix}{tenant}:user:{hash of user id}`.
///
/// Round trips: a load is one (`TIME`, `HGETALL` and the `PEXPIRE` that restarts the
/// inactivity clock, pipelined); a save is one (`MULTI` … `EXEC` writing the changed fields
/// only), and none when nothing changed; a new session is one; a login (`set_user`, which moves
/// the session to a new id) is one after the load. No Lua runs on these paths: a script costs
/// Redis several times the commands it sequences.
///
/// The `PEXPIRE` of a load or save is sent before the session's own inactivity timeout is
/// known: it uses the timeout most sessions this store has read and created lately have had
/// (a running majority vote; before the first, 24 hours, the layer's default). When the
/// session's own timeout differs (a minority set with
/// [`Session::set_expiry`](crate::session::Session::set_expiry), say), or its absolute end is
/// nearer than its inactivity timeout, a second round trip sets the right TTL. Absolute ends
/// are checked against Redis's clock (`TIME`), never the instance's.
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
}

/// What a read found under a session's key.
enum Fetched {
    Missing,
    Corrupt(Corrupt),
    Live {
        record: Record,
        /// Every field of the hash, write times included, when asked for (a replay's base).
        fields: Option<Vec<(String, String)>>,
    },
}

impl Fetched {
    /// The hash's fields of a live session, when they were kept.
    fn into_fields(self) -> Option<Vec<(String, String)>> {
        match self {
            Self::Live { fields, .. } => fields,
            Self::Missing | Self::Corrupt(_) => None,
        }
    }
}

impl RedisStore {
    /// A store on `backend`, with key prefix `turnstile:` and a 250 ms deadline per round trip.
    pub fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            keys: Keys::new("turnstile:"),
            timeout: Duration::from_millis(250),
            idle_vote: Arc::default(),
        }
    }

    /// The prefix of every key this store writes. Default: `turnstile:`.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.keys = Keys::new(prefix);
        self
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

    /// One pipeline, one round trip.
    async fn query<T: FromRedisValue + Send + 'static>(
        &self,
        pipe: Pipeline,
    ) -> Result<T, StoreError> {
        self.backend
            .run(self.timeout, |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
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
                // A server that refuses writes has become a replica (a failover): an outage of
                // the master, not a bad record.
                if let Some(Value::ServerError(error)) = replies.iter().find(|reply| {
                    matches!(reply, Value::ServerError(error) if error.code() == "READONLY")
                }) {
                    return Err(redis::RedisError::from(error.clone()));
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

    /// Reads a session and restarts its inactivity clock: one round trip, and a second only
    /// when the TTL sent with the read was not the session's (see the type's docs). The hash's
    /// fields are kept beside the record only when `keep_fields` (the fallback's replays).
    async fn fetch(&self, key: &SessionKey, keep_fields: bool) -> Result<Fetched, StoreError> {
        let redis_key = self.keys.session(key);
        let guess = self.idle_vote.guess();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        pipe.cmd("HGETALL").arg(&redis_key);
        pipe.cmd("PEXPIRE").arg(&redis_key).arg(guess).ignore();
        let Some(((seconds, micros), hash)) = self.query_hash::<((u64, u64), Value)>(pipe).await?
        else {
            return Ok(Fetched::Corrupt(Corrupt::Shape));
        };
        let now = seconds * 1000 + micros / 1000;
        let fields = match layout::hash_fields(hash) {
            Ok(fields) if fields.is_empty() => return Ok(Fetched::Missing),
            // What a save to a gone session left, read within its millisecond (and given a
            // longer TTL by this read): no session, removed.
            Ok(fields) if !fields.iter().any(|(name, _)| name.starts_with("m:")) => {
                self.remove_dead(&redis_key).await;
                return Ok(Fetched::Missing);
            }
            Ok(fields) => fields,
            Err(problem) => return Ok(Fetched::Corrupt(problem)),
        };
        let kept = keep_fields.then(|| fields.clone());
        let (record, tenant) = match layout::parse_record(fields) {
            Ok(parsed) => parsed,
            Err(problem) => return Ok(Fetched::Corrupt(problem)),
        };
        // The key already carries the tenant; this guards against a record copied under
        // another one.
        if tenant != key.tenant().as_str() {
            return Ok(Fetched::Missing);
        }
        self.idle_vote.vote(millis(record.inactivity_timeout));
        match millis(record.ttl_at(now)) {
            0 => {
                self.remove_dead(&redis_key).await;
                Ok(Fetched::Missing)
            }
            ttl => {
                self.set_ttl(&redis_key, ttl, guess).await;
                Ok(Fetched::Live {
                    record,
                    fields: kept,
                })
            }
        }
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
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(redis_key).ignore();
        let _ = self.query::<()>(pipe).await;
    }

    async fn members(&self, index: &str) -> Result<Vec<String>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(index);
        let (members,): (Vec<String>,) = self.query(pipe).await?;
        Ok(members)
    }

    /// Removes the sessions `keys` and the members `members` of the user index `index` (only
    /// those: a session indexed meanwhile keeps its entry); returns how many sessions were
    /// removed.
    async fn delete_sessions(
        &self,
        index: &str,
        keys: &[SessionKey],
        members: &[String],
    ) -> Result<usize, StoreError> {
        let mut batch = Batch::new();
        for key in keys {
            let mut part = Part::new();
            part.cmd("DEL").arg(self.keys.session(key));
            batch.push(part);
        }
        let mut unindex = Part::new();
        unindex.cmd("SREM").arg(index).arg(members);
        let unindexed = batch.push(unindex);
        let replies = self.run(batch).await?;
        let removed = (0..unindexed)
            .filter(|&part| matches!(replies.part(part).first(), Some(Value::Int(1))))
            .count();
        Ok(removed)
    }

    /// The transaction of a save: whether the session existed (a session is a hash with
    /// metadata), the changed fields with their write time `written`, the TTL `guess`, and
    /// what the TTL must really be (the absolute end and timeout, and Redis's time).
    ///
    /// Without a script the write cannot be made conditional: on a session that is gone it
    /// leaves a hash without metadata and without a TTL (every session has one). That hash is
    /// never served as a session, and the second `PEXPIRE` (NX: only a key without a TTL) makes
    /// it vanish within a millisecond.
    fn update_pipeline(redis_key: &str, patch: &Patch, written: u64, guess: u64) -> Pipeline {
        let (set, remove) = layout::patch_fields(patch);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HEXISTS").arg(redis_key).arg(TENANT);
        // Every field written or removed gets its write time, the writer's (see
        // `lua/replay.lua`).
        let mut hset = redis::cmd("HSET");
        hset.arg(redis_key);
        for (name, value) in &set {
            hset.arg(name)
                .arg(value)
                .arg(format!("{WRITTEN}{name}"))
                .arg(written);
        }
        for name in &remove {
            hset.arg(format!("{WRITTEN}{name}")).arg(written);
        }
        if !set.is_empty() || !remove.is_empty() {
            pipe.add_command(hset).ignore();
        }
        if !remove.is_empty() {
            pipe.cmd("HDEL").arg(redis_key).arg(&remove).ignore();
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
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        let problem = match self.fetch(key, false).await? {
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
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.keys.session(key)).ignore();
        // Best effort: the record is unusable whether or not the delete lands.
        let _ = self.query::<()>(pipe).await;
        Ok(None)
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        // One transaction on a server. On a cluster the record and the index are two requests
        // at once, and a record must never be left out of its user's index (it could not be
        // revoked), so when either part fails the record is removed again.
        let mut batch = Batch::new();
        batch.push(self.record_part(key, record));
        batch.push(self.index_part(key, record));
        let split = self.backend.splits(&batch);
        if let Err(error) = self.run(batch).await {
            if split {
                self.remove_dead(&self.keys.session(key)).await;
            }
            return Err(error);
        }
        Ok(())
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let redis_key = self.keys.session(key);
        let guess = patch
            .lifetime
            .map_or_else(|| self.idle_vote.guess(), |l| millis(l.inactivity_timeout));
        let pipe = Self::update_pipeline(&redis_key, patch, now_millis(), guess);
        type Reply = (i64, (Option<u64>, Option<u64>), (u64, u64));
        let ttl = match self.query_hash::<Reply>(pipe).await? {
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
            self.remove_dead(&redis_key).await;
            return Ok(Written::Missing);
        }
        self.set_ttl(&redis_key, ttl, guess).await;
        Ok(Written::Applied)
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
        let mut batch = Batch::new();
        batch.push(self.record_part(new, record));
        let mut index = self.index_part(new, record);
        let mut other_index = Part::new();
        if let Some(old_user) = old_user {
            let to = if record.user.as_deref() == Some(old_user) {
                &mut index
            } else {
                &mut other_index
            };
            self.unindex(to, old, old_user);
        }
        batch.push(index);
        batch.push(other_index);
        batch.then();
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
            return Ok(Written::Applied);
        }
        // The old session was destroyed meanwhile (say, by "log out everywhere"): the copy
        // must not outlive it.
        self.delete(new, record.user.as_deref()).await?;
        Ok(Written::Missing)
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        let mut record = Part::new();
        record.cmd("DEL").arg(self.keys.session(key));
        batch.push(record);
        let mut index = Part::new();
        if let Some(user) = user {
            self.unindex(&mut index, key, user);
        }
        batch.push(index);
        self.run(batch).await.map(drop)
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        let index = self.keys.user(user);
        let keys: Vec<SessionKey> = self
            .members(&index)
            .await?
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Each session hashes to its own slot: on a cluster, one read each, all at once.
        let mut batch = Batch::new();
        for key in &keys {
            let mut part = Part::new();
            part.cmd("HMGET")
                .arg(self.keys.session(key))
                .arg(CREATED)
                .arg(ABSOLUTE)
                .arg(USER);
            batch.push(part);
        }
        let replies = self.run(batch).await?;
        type Row = (Option<u64>, Option<u64>, Option<String>);
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (part, key) in keys.into_iter().enumerate() {
            let row = replies
                .part(part)
                .first()
                .map(redis::from_redis_value_ref::<Row>);
            match row {
                Some(Ok((Some(created), Some(expires), Some(owner)))) if owner == user.user() => {
                    live.push(SessionInfo {
                        key,
                        created_at: from_unix_millis(created),
                        expires_at: from_unix_millis(expires),
                    });
                }
                _ => gone.push(key.hash()),
            }
        }
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("SREM").arg(&index).arg(gone).ignore();
            // Pruning is housekeeping: the listing is right whether or not it lands.
            let _ = self.query::<()>(pipe).await;
        }
        Ok(live)
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let index = self.keys.user(user);
        let members = self.members(&index).await?;
        if members.is_empty() {
            return Ok(0);
        }
        let keys: Vec<SessionKey> = members
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect();
        self.delete_sessions(&index, &keys, &members).await
    }
}
