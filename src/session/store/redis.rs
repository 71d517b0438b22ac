#[cfg(feature = "memory")]
use std::sync::LazyLock;
use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::{Pipeline, Value};

use super::{Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written};
use crate::{
    backend::RedisBackend,
    time::{from_unix_millis, millis, now_millis, unix_millis},
};

/// Sent as `EVAL` in a pipeline (with the user-index commands): there a `NOSCRIPT` reply (after
/// a Redis restart) could not be retried without repeating the pipeline's other commands.
#[cfg(feature = "memory")]
static REPLAY_INLINE: LazyLock<String> =
    LazyLock::new(|| without_comments(include_str!("lua/replay.lua")));

#[cfg(feature = "memory")]
fn without_comments(script: &str) -> String {
    script
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

const DATA: &str = "d:";
const USER: &str = "m:user";
const CREATED: &str = "m:created";
const ABSOLUTE: &str = "m:abs";
const IDLE: &str = "m:idle";
const TENANT: &str = "m:tenant";
const PERSISTENT: &str = "m:persist";
/// Prefix of a field's write time (see `lua/replay.lua`).
const WRITTEN: &str = "t:";

/// The inactivity timeout a read or write assumes before it knows the session's own: the
/// session layer's default.
const DEFAULT_IDLE_MS: u64 = 24 * 3600 * 1000;

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
    prefix: String,
    timeout: Duration,
    /// The inactivity timeout most sessions seen lately have had. Shared by clones.
    idle_vote: Arc<IdleVote>,
}

/// A running majority vote (Boyer–Moore) over the inactivity timeouts of the sessions a store
/// reads and creates: if one timeout is held by most of them, it wins. One atomic word (the
/// candidate's milliseconds above a 16-bit count), so the request path takes no lock; a race
/// between two votes loses one of them, which only makes the guess a little slower to change.
#[derive(Debug, Default)]
struct IdleVote(AtomicU64);

impl IdleVote {
    const COUNT_BITS: u32 = 16;
    const MAX_COUNT: u64 = 64;

    /// The winning inactivity timeout (ms), or `None` before any vote.
    fn winner(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) >> Self::COUNT_BITS {
            0 => None,
            idle => Some(idle),
        }
    }

    fn vote(&self, idle_ms: u64) {
        // Timeouts past 2^48 ms (8900 years) vote as that.
        let idle_ms = idle_ms.clamp(1, u64::MAX >> Self::COUNT_BITS);
        let mask = (1 << Self::COUNT_BITS) - 1;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (candidate, count) = (word >> Self::COUNT_BITS, word & mask);
                let (candidate, count) = if candidate == idle_ms {
                    if count == Self::MAX_COUNT {
                        // Settled: no write, so reads on every core share the word unmodified.
                        return None;
                    }
                    (candidate, count + 1)
                } else if count == 0 {
                    (idle_ms, 1)
                } else {
                    (candidate, count - 1)
                };
                Some(candidate << Self::COUNT_BITS | count)
            });
    }
}

impl RedisStore {
    /// A store on `backend`, with key prefix `turnstile:` and a 250 ms deadline per round trip.
    pub fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            prefix: "turnstile:".to_owned(),
            timeout: Duration::from_millis(250),
            idle_vote: Arc::default(),
        }
    }

    /// The prefix of every key this store writes. Default: `turnstile:`.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
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

    #[cfg(feature = "postgres")]
    pub(crate) fn key_prefix(&self) -> &str {
        &self.prefix
    }

    fn session_key(&self, key: &SessionKey) -> String {
        format!("{}{}:session:{}", self.prefix, key.tenant(), key.hash())
    }

    fn user_key(&self, user: &UserKey) -> String {
        format!("{}{}:user:{}", self.prefix, user.tenant(), user.hash())
    }

    /// The TTL (ms) a load or save sends before it knows the session's inactivity timeout.
    fn idle_guess(&self) -> u64 {
        self.idle_vote.winner().unwrap_or(DEFAULT_IDLE_MS)
    }

    /// Every field of `record`'s hash, as field, value, field, value, ...
    fn record_fields(key: &SessionKey, record: &Record) -> Vec<String> {
        let mut fields = vec![
            TENANT.to_owned(),
            key.tenant().as_str().to_owned(),
            CREATED.to_owned(),
            record.created_at.to_string(),
            ABSOLUTE.to_owned(),
            record.expires_at.to_string(),
            IDLE.to_owned(),
            millis(record.inactivity_timeout).to_string(),
            PERSISTENT.to_owned(),
            flag(record.persistent).to_owned(),
        ];
        if let Some(user) = &record.user {
            fields.extend([USER.to_owned(), user.clone()]);
        }
        for (name, value) in &record.data {
            fields.extend([format!("{DATA}{name}"), value.clone()]);
        }
        fields
    }

    /// The hash fields a patch sets (metadata included when the lifetime changes) and removes.
    fn patch_fields(patch: &Patch) -> (Vec<(String, String)>, Vec<String>) {
        let mut set = Vec::with_capacity(patch.set.len() + 3);
        if let Some(lifetime) = patch.lifetime {
            set.extend([
                (
                    IDLE.to_owned(),
                    millis(lifetime.inactivity_timeout).to_string(),
                ),
                (ABSOLUTE.to_owned(), lifetime.expires_at.to_string()),
                (PERSISTENT.to_owned(), flag(lifetime.persistent).to_owned()),
            ]);
        }
        set.extend(
            patch
                .set
                .iter()
                .map(|(name, value)| (format!("{DATA}{name}"), value.clone())),
        );
        let remove = patch
            .remove
            .iter()
            .map(|name| format!("{DATA}{name}"))
            .collect();
        (set, remove)
    }

    /// Adds the commands that write `record` under `key` and index it under its user. The hash
    /// gets its TTL in the same transaction (callers make the pipeline atomic): the inactivity
    /// timeout, cut short by the absolute end (`PEXPIREAT … LT`, on Redis's clock; an end
    /// already past removes the hash at once).
    fn push_create(&self, pipe: &mut Pipeline, key: &SessionKey, record: &Record) {
        self.push_record(pipe, key, record);
        self.push_index(pipe, key, record);
    }

    /// Adds the commands that write `record`'s hash under `key`, with its TTL.
    fn push_record(&self, pipe: &mut Pipeline, key: &SessionKey, record: &Record) {
        let redis_key = self.session_key(key);
        pipe.cmd("HSET")
            .arg(&redis_key)
            .arg(Self::record_fields(key, record))
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(millis(record.inactivity_timeout).max(1))
            .ignore();
        pipe.cmd("PEXPIREAT")
            .arg(&redis_key)
            .arg(record.expires_at)
            .arg("LT")
            .ignore();
        self.idle_vote.vote(millis(record.inactivity_timeout));
    }

    /// Adds the commands that index `key` under the record's user, if it has one.
    fn push_index(&self, pipe: &mut Pipeline, key: &SessionKey, record: &Record) {
        if let Some(user) = &record.user {
            let index = self.user_key(&UserKey::new(key.tenant(), user.as_str()));
            pipe.cmd("SADD").arg(&index).arg(key.hash()).ignore();
            // The index lives as long as its longest-lived session: NX gives a new index a
            // TTL, GT only ever extends it.
            pipe.cmd("PEXPIREAT")
                .arg(&index)
                .arg(record.expires_at)
                .arg("NX")
                .ignore();
            pipe.cmd("PEXPIREAT")
                .arg(&index)
                .arg(record.expires_at)
                .arg("GT")
                .ignore();
        }
    }

    fn push_delete(&self, pipe: &mut Pipeline, key: &SessionKey, user: Option<&str>) {
        pipe.cmd("DEL").arg(self.session_key(key));
        if let Some(user) = user {
            self.push_unindex(pipe, key, user);
        }
    }

    /// Adds the command that removes `key` from `user`'s index.
    fn push_unindex(&self, pipe: &mut Pipeline, key: &SessionKey, user: &str) {
        pipe.cmd("SREM")
            .arg(self.user_key(&UserKey::new(key.tenant(), user)))
            .arg(key.hash())
            .ignore();
    }

    async fn query<T: redis::FromRedisValue + Send + 'static>(
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

    /// Runs `pipes` at the same time, each in its own round trip: on a Redis Cluster, where
    /// one pipeline may touch one hash slot only, the parts of an operation that touch keys
    /// of different slots (a session and its user's index, the sessions of a user) are sent
    /// this way, so the operation still waits for one round trip. Fails if any part fails.
    async fn query_each<T: redis::FromRedisValue + Send + 'static>(
        &self,
        pipes: Vec<Pipeline>,
    ) -> Result<Vec<T>, StoreError> {
        futures_util::future::try_join_all(pipes.into_iter().map(|pipe| self.query::<T>(pipe)))
            .await
    }

    /// Runs `pipe`, answering `None` when Redis refuses one of its commands because the key
    /// holds something that is not a hash (`WRONGTYPE`): a corrupted record, not an outage.
    async fn query_hash<T: redis::FromRedisValue + Send + 'static>(
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
        let redis_key = self.session_key(key);
        let guess = self.idle_guess();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        pipe.cmd("HGETALL").arg(&redis_key);
        pipe.cmd("PEXPIRE").arg(&redis_key).arg(guess).ignore();
        let Some(((seconds, micros), hash)) = self.query_hash::<((u64, u64), Value)>(pipe).await?
        else {
            return Ok(Fetched::Corrupt(Corrupt::Shape));
        };
        let now = seconds * 1000 + micros / 1000;
        let fields = match hash_fields(hash) {
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
        let (record, tenant) = match parse_record(fields) {
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
}

/// How a journaled write is replayed; see `lua/replay.lua`.
#[cfg(feature = "memory")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplayMode {
    /// The session was created (or moved to this key) during the outage: written if absent.
    Create,
    /// The session must still exist in Redis; one that is gone stays gone.
    Patch,
}

/// One journaled write, in the shape the replay script takes.
#[cfg(feature = "memory")]
#[derive(Debug)]
pub(crate) struct ReplayWrite<'a> {
    pub(crate) mode: ReplayMode,
    /// When the write was made (Unix ms).
    pub(crate) at: u64,
    /// Fields written as they are when the hash is absent.
    pub(crate) base: Vec<String>,
    pub(crate) patch: &'a Patch,
    /// A user binding made by the write, compared by time like any field.
    pub(crate) user: Option<&'a str>,
    /// Index the session under this user, up to this absolute end.
    pub(crate) index: Option<(&'a str, u64)>,
}

/// The fallback store's way back into Redis: the writes it journaled during an outage.
#[cfg(feature = "memory")]
impl RedisStore {
    /// Every field of a live session's hash as it is (write times included), restarting its
    /// inactivity clock; `None` when there is no such live session.
    pub(crate) async fn load_raw(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Vec<String>>, StoreError> {
        Ok(match self.fetch(key, true).await? {
            Fetched::Live { fields, .. } => {
                fields.map(|fields| fields.into_iter().flat_map(|(n, v)| [n, v]).collect())
            }
            Fetched::Missing | Fetched::Corrupt(_) => None,
        })
    }

    /// The fields of `record` as the base of a replayed create.
    pub(crate) fn base_fields(key: &SessionKey, record: &Record) -> Vec<String> {
        Self::record_fields(key, record)
    }

    /// Whether `key` holds a session (a hash with metadata).
    pub(crate) async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HEXISTS").arg(self.session_key(key)).arg(TENANT);
        let (found,): (i64,) = self.query(pipe).await?;
        Ok(found == 1)
    }

    /// Replays one journaled write in one round trip; `false` when the session is gone.
    pub(crate) async fn replay(
        &self,
        key: &SessionKey,
        write: &ReplayWrite<'_>,
    ) -> Result<bool, StoreError> {
        let (mut set, remove) = Self::patch_fields(write.patch);
        if let Some(user) = write.user {
            set.push((USER.to_owned(), user.to_owned()));
        }
        let mut script = redis::cmd("EVAL");
        script
            .arg(REPLAY_INLINE.as_str())
            .arg(1)
            .arg(self.session_key(key))
            .arg(match write.mode {
                ReplayMode::Create => "create",
                ReplayMode::Patch => "patch",
            })
            .arg(write.at)
            .arg(write.base.len() / 2)
            .arg(set.len())
            .arg(remove.len())
            .arg(&write.base);
        for (name, value) in &set {
            script.arg(name).arg(value);
        }
        script.arg(remove);
        let mut pipe = redis::pipe();
        pipe.add_command(script);
        let mut index = redis::pipe();
        if let Some((user, expires_at)) = write.index {
            let mut record = Record::new(Duration::ZERO, Duration::ZERO);
            record.user = Some(user.to_owned());
            record.expires_at = expires_at;
            // On a cluster the index is another slot: its own pipeline, sent at the same time.
            let to = if self.backend.is_cluster() {
                &mut index
            } else {
                &mut pipe
            };
            self.push_index(to, key, &record);
        }
        let applied = if index.cmd_iter().next().is_some() {
            let mut replies = self.query_each::<Vec<i64>>(vec![pipe, index]).await?;
            replies.swap_remove(0).first().copied().unwrap_or(0)
        } else {
            let (applied,): (i64,) = self.query(pipe).await?;
            applied
        };
        Ok(applied == 1)
    }

    /// Removes the sessions of `user` created at or before `at` (Unix ms): a "log out
    /// everywhere" made during an outage ends the sessions it could have seen, not the logins
    /// made after it. Returns how many were removed.
    pub(crate) async fn delete_user_sessions_before(
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
        if self.backend.is_cluster() {
            let hashes: Vec<String> = ended.iter().map(SessionKey::hash).collect();
            return self
                .delete_on_cluster(&self.user_key(user), &ended, &hashes)
                .await;
        }
        let mut pipe = redis::pipe();
        for key in &ended {
            self.push_delete(&mut pipe, key, Some(user.user()));
        }
        let removed: Vec<i64> = self.query(pipe).await?;
        Ok(removed.into_iter().filter(|&n| n == 1).count())
    }
}

/// The operations whose keys hash to different slots, as a Redis Cluster needs them: one
/// pipeline per slot, sent at the same time.
impl RedisStore {
    /// A new session bound to a user: the index entry and the record at once. A record must
    /// never be left out of its user's index (it could not be revoked), so when either part
    /// fails the record is removed again.
    async fn create_on_cluster(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        let mut index = redis::pipe();
        self.push_index(&mut index, key, record);
        let mut hash = redis::pipe();
        hash.atomic();
        self.push_record(&mut hash, key, record);
        if let Err(error) = self.query_each::<()>(vec![index, hash]).await {
            self.remove_dead(&self.session_key(key)).await;
            return Err(error);
        }
        Ok(())
    }

    /// A new id for a session, in two round trips: first the new record and the index
    /// changes, then the old record's removal, which says whether it was still live. An old
    /// session destroyed meanwhile takes the new one with it (a third round trip). A failure
    /// between the two leaves the old id valid until its own expiry; the new record is removed
    /// again.
    async fn cycle_on_cluster(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        let mut hash = redis::pipe();
        hash.atomic();
        self.push_record(&mut hash, new, record);
        let mut parts = vec![hash];
        let new_user = record.user.as_deref();
        if new_user.is_some() || old_user.is_some() {
            let mut index = redis::pipe();
            self.push_index(&mut index, new, record);
            if let Some(old_user) = old_user {
                if new_user == Some(old_user) {
                    self.push_unindex(&mut index, old, old_user);
                } else {
                    let mut other = redis::pipe();
                    self.push_unindex(&mut other, old, old_user);
                    parts.push(other);
                }
            }
            // A session cycled out of a login (no user any more) has nothing to index.
            if index.cmd_iter().next().is_some() {
                parts.push(index);
            }
        }
        let undo = |this: &Self| {
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(this.session_key(new)).ignore();
            pipe
        };
        if let Err(error) = self.query_each::<()>(parts).await {
            let _ = self.query::<()>(undo(self)).await;
            return Err(error);
        }
        let mut retire = redis::pipe();
        retire.atomic();
        retire.cmd("HEXISTS").arg(self.session_key(old)).arg(TENANT);
        retire.cmd("DEL").arg(self.session_key(old)).ignore();
        match self.query::<(i64,)>(retire).await {
            Ok((1,)) => Ok(Written::Applied),
            Ok(_) => {
                // The old session was destroyed meanwhile: the copy must not outlive it.
                self.delete(new, new_user).await?;
                Ok(Written::Missing)
            }
            Err(error) => {
                let _ = self.query::<()>(undo(self)).await;
                Err(error)
            }
        }
    }

    /// Removes `keys` (one pipeline each) and the index members `members`, all at once;
    /// returns how many sessions were removed.
    async fn delete_on_cluster(
        &self,
        index: &str,
        keys: &[SessionKey],
        members: &[String],
    ) -> Result<usize, StoreError> {
        let mut parts: Vec<Pipeline> = keys
            .iter()
            .map(|key| {
                let mut pipe = redis::pipe();
                pipe.cmd("DEL").arg(self.session_key(key));
                pipe
            })
            .collect();
        let mut unindex = redis::pipe();
        // Only the members seen are removed: a session indexed meanwhile keeps its entry.
        unindex.cmd("SREM").arg(index).arg(members).ignore();
        parts.push(unindex);
        let removed: Vec<Vec<i64>> = self.query_each(parts).await?;
        Ok(removed.into_iter().flatten().filter(|&n| n == 1).count())
    }
}

/// Why a stored hash is not a session.
#[derive(Debug, PartialEq, Eq)]
enum Corrupt {
    Shape,
    Metadata,
    Value(String),
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape => f.write_str("not a session hash"),
            Self::Metadata => f.write_str("metadata fields missing or malformed"),
            Self::Value(key) => write!(f, "value of key {key:?} is not JSON"),
        }
    }
}

/// What a read found under a session's key.
enum Fetched {
    Missing,
    Corrupt(Corrupt),
    Live {
        record: Record,
        /// Every field of the hash, write times included, when asked for.
        #[cfg_attr(
            not(feature = "memory"),
            expect(dead_code, reason = "only the fallback store's replays read them")
        )]
        fields: Option<Vec<(String, String)>>,
    },
}

/// The field, value pairs of an `HGETALL` reply (flat in RESP2, a map in RESP3).
fn hash_fields(reply: Value) -> Result<Vec<(String, String)>, Corrupt> {
    let text = |value: Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| Corrupt::Shape),
        _ => Err(Corrupt::Shape),
    };
    match reply {
        Value::Array(items) => {
            let mut items = items.into_iter();
            let mut fields = Vec::with_capacity(items.len() / 2);
            while let Some(name) = items.next() {
                let value = items.next().ok_or(Corrupt::Shape)?;
                fields.push((text(name)?, text(value)?));
            }
            Ok(fields)
        }
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(name, value)| Ok((text(name)?, text(value)?)))
            .collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(Corrupt::Shape),
    }
}

/// The record in a session hash's fields, and the tenant it was written for.
fn parse_record(fields: Vec<(String, String)>) -> Result<(Record, String), Corrupt> {
    let mut data = BTreeMap::new();
    let (mut user, mut created, mut absolute, mut idle, mut tenant) =
        (None, None, None, None, None);
    // Records written before the cookie kind was stored had persistent cookies.
    let mut persistent = true;
    for (name, value) in fields {
        if let Some(key) = name.strip_prefix(DATA) {
            if serde_json::from_str::<serde::de::IgnoredAny>(&value).is_err() {
                return Err(Corrupt::Value(key.to_owned()));
            }
            data.insert(key.to_owned(), value);
            continue;
        }
        match name.as_str() {
            USER => user = Some(value),
            CREATED => created = value.parse::<u64>().ok(),
            ABSOLUTE => absolute = value.parse::<u64>().ok(),
            IDLE => idle = value.parse::<u64>().ok(),
            TENANT => tenant = Some(value),
            PERSISTENT => persistent = value != flag(false),
            _ => {}
        }
    }
    let (Some(created_at), Some(expires_at), Some(idle), Some(tenant)) =
        (created, absolute, idle, tenant)
    else {
        return Err(Corrupt::Metadata);
    };
    let record = Record {
        data,
        user,
        created_at,
        expires_at,
        inactivity_timeout: Duration::from_millis(idle),
        persistent,
    };
    Ok((record, tenant))
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
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
        pipe.cmd("DEL").arg(self.session_key(key)).ignore();
        // Best effort: the record is unusable whether or not the delete lands.
        let _ = self.query::<()>(pipe).await;
        Ok(None)
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        if self.backend.is_cluster() && record.user.is_some() {
            return self.create_on_cluster(key, record).await;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.push_create(&mut pipe, key, record);
        self.query::<()>(pipe).await
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let redis_key = self.session_key(key);
        let (set, remove) = Self::patch_fields(patch);
        // Every field written or removed gets its write time, the writer's (see
        // `lua/replay.lua`).
        let written = now_millis();
        let guess = patch
            .lifetime
            .map_or_else(|| self.idle_guess(), |l| millis(l.inactivity_timeout));
        // One transaction: whether the session existed (a session is a hash with metadata),
        // the write, its TTL and Redis's time.
        // Without a script the write cannot be made conditional: on a session that is gone it
        // leaves a hash without metadata and without a TTL (every session has one). That hash
        // is never served as a session, and the second PEXPIRE (NX: only a key without a TTL)
        // makes it vanish within a millisecond.
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HEXISTS").arg(&redis_key).arg(TENANT);
        let mut hset = redis::cmd("HSET");
        hset.arg(&redis_key);
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
            pipe.cmd("HDEL").arg(&redis_key).arg(&remove).ignore();
        }
        pipe.cmd("HMGET").arg(&redis_key).arg(ABSOLUTE).arg(IDLE);
        pipe.cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(guess)
            .arg("XX")
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(1)
            .arg("NX")
            .ignore();
        pipe.cmd("TIME");
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

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        if self.backend.is_cluster() {
            return self.cycle_on_cluster(old, old_user, new, record).await;
        }
        // One transaction: the new record is written and the old one removed together.
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HEXISTS").arg(self.session_key(old)).arg(TENANT);
        self.push_create(&mut pipe, new, record);
        self.push_delete(&mut pipe, old, old_user);
        let (live, _removed): (i64, i64) = self.query(pipe).await?;
        if live == 1 {
            return Ok(Written::Applied);
        }
        // The old session was destroyed meanwhile (say, by "log out everywhere"): the copy
        // must not outlive it.
        let mut pipe = redis::pipe();
        self.push_delete(&mut pipe, new, record.user.as_deref());
        self.query::<(i64,)>(pipe).await?;
        Ok(Written::Missing)
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        if self.backend.is_cluster()
            && let Some(user) = user
        {
            let mut record = redis::pipe();
            record.cmd("DEL").arg(self.session_key(key)).ignore();
            let mut index = redis::pipe();
            self.push_unindex(&mut index, key, user);
            return self.query_each::<()>(vec![record, index]).await.map(drop);
        }
        let mut pipe = redis::pipe();
        self.push_delete(&mut pipe, key, user);
        self.query::<(i64,)>(pipe).await.map(drop)
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        let index = self.user_key(user);
        let members = self.members(&index).await?;
        let keys: Vec<SessionKey> = members
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let row = |pipe: &mut Pipeline, key: &SessionKey| {
            pipe.cmd("HMGET")
                .arg(self.session_key(key))
                .arg(CREATED)
                .arg(ABSOLUTE)
                .arg(USER);
        };
        type Row = (Option<u64>, Option<u64>, Option<String>);
        let rows: Vec<Row> = if self.backend.is_cluster() {
            // Each session hashes to its own slot: one read each, all at once.
            let pipes = keys
                .iter()
                .map(|key| {
                    let mut pipe = redis::pipe();
                    row(&mut pipe, key);
                    pipe
                })
                .collect();
            let rows: Vec<(Row,)> = self.query_each(pipes).await?;
            rows.into_iter().map(|(row,)| row).collect()
        } else {
            let mut pipe = redis::pipe();
            for key in &keys {
                row(&mut pipe, key);
            }
            self.query(pipe).await?
        };
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (key, row) in keys.into_iter().zip(rows) {
            match row {
                (Some(created), Some(expires), Some(owner)) if owner == user.user() => {
                    live.push(SessionInfo {
                        key,
                        created_at: from_unix_millis(created),
                        expires_at: from_unix_millis(expires),
                    })
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
        let index = self.user_key(user);
        let members = self.members(&index).await?;
        let keys: Vec<SessionKey> = members
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect();
        if members.is_empty() {
            return Ok(0);
        }
        if self.backend.is_cluster() {
            return self.delete_on_cluster(&index, &keys, &members).await;
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("DEL").arg(self.session_key(key));
        }
        // Only the members seen are removed: a session indexed meanwhile keeps its entry.
        pipe.cmd("SREM").arg(&index).arg(&members).ignore();
        let removed: Vec<i64> = self.query(pipe).await?;
        Ok(removed.into_iter().filter(|&n| n == 1).count())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use redis::Value;

    use super::{
        ABSOLUTE, CREATED, DATA, IDLE, IdleVote, PERSISTENT, RedisStore, TENANT, USER, hash_fields,
        parse_record,
    };
    use crate::{session::store::SessionKey, tenant::Tenant};

    /// A hash field name: mostly the names the store writes, some of them data fields.
    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![ABSOLUTE, CREATED, IDLE, PERSISTENT, TENANT, USER])
                .prop_map(str::to_owned),
            "[a-z:]{0,8}".prop_map(|name| format!("{DATA}{name}")),
            "[ -~]{0,10}",
        ]
    }

    /// A field value: numbers, JSON, tenant names, or any text.
    fn field_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("\"v\"".to_owned()),
            Just("{\"a\":[1,2]}".to_owned()),
            "[a-z]{1,8}",
            "\\PC{0,16}",
        ]
    }

    /// Any fields, after (in most cases) the metadata of a live record, which they may spoil.
    fn fields() -> impl Strategy<Value = Vec<(String, String)>> {
        let metadata = (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            "[a-z]{1,8}",
            any::<bool>(),
        )
            .prop_map(|(created, absolute, idle, tenant, persistent)| {
                vec![
                    (CREATED.to_owned(), created.to_string()),
                    (ABSOLUTE.to_owned(), absolute.to_string()),
                    (IDLE.to_owned(), idle.to_string()),
                    (TENANT.to_owned(), tenant),
                    (
                        PERSISTENT.to_owned(),
                        if persistent { "1" } else { "0" }.to_owned(),
                    ),
                ]
            });
        (
            proptest::option::weighted(0.8, metadata),
            proptest::collection::vec((field_name(), field_value()), 0..12),
        )
            .prop_map(|(metadata, fields)| {
                metadata
                    .unwrap_or_default()
                    .into_iter()
                    .chain(fields)
                    .collect()
            })
    }

    fn size(fields: &[(String, String)]) -> usize {
        fields
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum()
    }

    proptest! {
        /// Decoding any hash never panics; a decoded record encodes back to fields that decode
        /// to the same record and tenant (encode(decode(x)) is stable), and it holds no more
        /// text than the hash it came from.
        #[test]
        fn a_decoded_record_encodes_back_to_itself(fields in fields()) {
            let input = size(&fields);
            let Ok((record, tenant)) = parse_record(fields) else {
                return Ok(());
            };
            let held = record.data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                + record.user.as_ref().map_or(0, String::len);
            prop_assert!(held <= input, "{held} bytes from {input}");
            // Only a valid tenant name makes a key; the store refuses a record of any other.
            let Ok(name) = Tenant::new(&tenant) else {
                return Ok(());
            };
            let key = SessionKey::from_hash(&name, &"A".repeat(43)).expect("a valid hash");
            let encoded: Vec<(String, String)> = RedisStore::record_fields(&key, &record)
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            let again = parse_record(encoded.clone());
            prop_assert_eq!(again, Ok((record.clone(), tenant.clone())));
            // And encoding once more gives the very same fields.
            let (record, _) = parse_record(encoded.clone()).expect("decodes");
            let twice: Vec<String> = RedisStore::record_fields(&key, &record);
            let encoded_flat: Vec<String> =
                encoded.into_iter().flat_map(|(name, value)| [name, value]).collect();
            prop_assert_eq!(twice, encoded_flat);
        }

        /// Any `HGETALL` reply shape reads as field pairs, each taken from the reply's own
        /// strings, or as corrupt; never a panic.
        #[test]
        fn any_hash_reply_reads_as_its_pairs_or_corrupt(
            items in proptest::collection::vec(
                prop_oneof![
                    "[ -~]{0,8}".prop_map(|t| Value::BulkString(t.into_bytes())),
                    proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::BulkString),
                    any::<i64>().prop_map(Value::Int),
                    Just(Value::Nil),
                ],
                0..10,
            ),
            as_map in any::<bool>(),
        ) {
            let strings = items.iter().filter(|v| matches!(v, Value::BulkString(_))).count();
            let reply = if as_map {
                Value::Map(items.chunks(2).map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or(Value::Nil))).collect())
            } else {
                Value::Array(items.clone())
            };
            if let Ok(pairs) = hash_fields(reply) {
                prop_assert!(pairs.len() * 2 <= strings.max(1) || pairs.is_empty());
                for (name, value) in &pairs {
                    let found = |text: &String| items.contains(&Value::BulkString(text.clone().into_bytes()));
                    prop_assert!(found(name) && found(value));
                }
            }
        }
    }

    #[test]
    fn the_idle_vote_follows_the_majority() {
        let vote = IdleVote::default();
        assert_eq!(vote.winner(), None);
        // Two sessions in three have the default; the rest a "remember me" timeout.
        for _ in 0..100 {
            vote.vote(1_800_000);
            vote.vote(1_800_000);
            vote.vote(2_592_000_000);
        }
        assert_eq!(vote.winner(), Some(1_800_000));
        // The population changes: the long timeout becomes the majority, and wins.
        for _ in 0..200 {
            vote.vote(2_592_000_000);
            vote.vote(2_592_000_000);
            vote.vote(1_800_000);
        }
        assert_eq!(vote.winner(), Some(2_592_000_000));
    }

    #[test]
    fn the_idle_vote_takes_any_timeout() {
        let vote = IdleVote::default();
        vote.vote(0);
        assert_eq!(vote.winner(), Some(1));
        vote.vote(u64::MAX);
        vote.vote(u64::MAX);
        assert_eq!(vote.winner(), Some(u64::MAX >> IdleVote::COUNT_BITS));
    }
}
