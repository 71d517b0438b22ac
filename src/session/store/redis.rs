use std::{collections::BTreeMap, fmt, sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::{Pipeline, Script, Value};

use super::{
    Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written,
    from_unix_millis, millis,
};
use crate::backend::RedisBackend;

static LOAD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/load.lua")));
static UPDATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/update.lua")));
static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/create.lua")));
/// Sent as `EVAL` in a pipeline (with the user-index commands), like `CREATE_INLINE`.
#[cfg(feature = "memory")]
static REPLAY_INLINE: LazyLock<String> =
    LazyLock::new(|| without_comments(include_str!("lua/replay.lua")));
/// The create script without its comments, sent as `EVAL` inside pipelines: there a `NOSCRIPT`
/// reply (after a Redis restart) could not be retried without repeating the pipeline's other
/// commands, such as the removal of the old record in a cycle.
static CREATE_INLINE: LazyLock<String> =
    LazyLock::new(|| without_comments(include_str!("lua/create.lua")));

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

/// Sessions in Redis, shared by every instance that uses the same Redis.
///
/// Each session is one Redis hash (a field per session key, plus metadata fields) whose TTL
/// does the cleanup; each user has a set indexing their sessions, so they can be listed and
/// revoked from any instance. Keys are `{prefix}{tenant}:session:{hash of id}` and
/// `{prefix}{tenant}:user:{hash of user id}`.
///
/// Round trips: a load is one (`EVALSHA` that also restarts the inactivity clock); a save is
/// one (`EVALSHA` of the changed fields only), and none when nothing changed; a new session is
/// one; a login (`set_user`, which moves the session to a new id) is one after the load.
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
}

impl RedisStore {
    /// A store on `backend`, with key prefix `turnstile:` and a 250 ms deadline per round trip.
    pub fn new(backend: RedisBackend) -> Self {
        Self {
            backend,
            prefix: "turnstile:".to_owned(),
            timeout: Duration::from_millis(250),
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

    fn session_key(&self, key: &SessionKey) -> String {
        format!("{}{}:session:{}", self.prefix, key.tenant(), key.hash())
    }

    fn user_key(&self, user: &UserKey) -> String {
        format!("{}{}:user:{}", self.prefix, user.tenant(), user.hash())
    }

    /// The arguments of the create script for `record`: inactivity, absolute end, then fields.
    fn create_args(key: &SessionKey, record: &Record) -> Vec<String> {
        let mut args = vec![
            millis(record.inactivity_timeout).to_string(),
            record.expires_at.to_string(),
        ];
        args.extend(Self::record_fields(key, record));
        args
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

    /// Adds the commands that write `record` under `key` and index it under its user.
    fn push_create(&self, pipe: &mut Pipeline, key: &SessionKey, record: &Record) {
        let mut create = redis::cmd("EVAL");
        create
            .arg(CREATE_INLINE.as_str())
            .arg(1)
            .arg(self.session_key(key))
            .arg(Self::create_args(key, record));
        pipe.add_command(create).ignore();
        self.push_index(pipe, key, record);
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
            pipe.cmd("SREM")
                .arg(self.user_key(&UserKey::new(key.tenant(), user)))
                .arg(key.hash())
                .ignore();
        }
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

    /// One round trip of the load script (see `lua/load.lua` for the reply's shape).
    async fn invoke_load(&self, key: &SessionKey) -> Result<Vec<Value>, StoreError> {
        let redis_key = self.session_key(key);
        let tenant = key.tenant().as_str().to_owned();
        self.backend
            .run(self.timeout, |mut conn| async move {
                LOAD.key(&redis_key)
                    .arg(tenant)
                    .invoke_async(&mut conn)
                    .await
            })
            .await
            .map_err(StoreError::from)
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
        let mut reply = self.invoke_load(key).await?.into_iter();
        if !matches!(reply.next(), Some(Value::Int(1))) {
            return Ok(None);
        }
        Ok(Some(
            reply
                .filter_map(|value| match value {
                    Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
                    _ => None,
                })
                .collect(),
        ))
    }

    /// The fields of `record` as the base of a replayed create.
    pub(crate) fn base_fields(key: &SessionKey, record: &Record) -> Vec<String> {
        Self::record_fields(key, record)
    }

    /// Whether `key` holds anything.
    pub(crate) async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(self.session_key(key));
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
        if let Some((user, expires_at)) = write.index {
            let mut record = Record::new(Duration::ZERO, Duration::ZERO);
            record.user = Some(user.to_owned());
            record.expires_at = expires_at;
            self.push_index(&mut pipe, key, &record);
        }
        let (applied,): (i64,) = self.query(pipe).await?;
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
            .filter(|info| super::unix_millis(info.created_at) <= at)
            .map(|info| info.key)
            .collect();
        if ended.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for key in &ended {
            self.push_delete(&mut pipe, key, Some(user.user()));
        }
        let removed: Vec<i64> = self.query(pipe).await?;
        Ok(removed.into_iter().filter(|&n| n == 1).count())
    }
}

/// Why a stored hash is not a session.
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

fn parse_record(fields: Vec<Value>) -> Result<Record, Corrupt> {
    let mut data = BTreeMap::new();
    let (mut user, mut created, mut absolute, mut idle) = (None, None, None, None);
    // Records written before the cookie kind was stored had persistent cookies.
    let mut persistent = true;
    let mut fields = fields.into_iter();
    while let (Some(Value::BulkString(name)), Some(Value::BulkString(value))) =
        (fields.next(), fields.next())
    {
        let (Ok(name), Ok(value)) = (String::from_utf8(name), String::from_utf8(value)) else {
            return Err(Corrupt::Shape);
        };
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
            PERSISTENT => persistent = value != flag(false),
            _ => {}
        }
    }
    let (Some(created_at), Some(expires_at), Some(idle)) = (created, absolute, idle) else {
        return Err(Corrupt::Metadata);
    };
    Ok(Record {
        data,
        user,
        created_at,
        expires_at,
        inactivity_timeout: Duration::from_millis(idle),
        persistent,
    })
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        let mut reply = self.invoke_load(key).await?.into_iter();
        let problem = match reply.next() {
            Some(Value::Int(0)) => return Ok(None),
            Some(Value::Int(1)) => match parse_record(reply.collect()) {
                Ok(record) => return Ok(Some(record)),
                Err(problem) => problem,
            },
            _ => Corrupt::Shape,
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
        if record.user.is_some() {
            let mut pipe = redis::pipe();
            self.push_create(&mut pipe, key, record);
            return self.query::<()>(pipe).await;
        }
        // The common case, a new anonymous session, is one cached-script call.
        let mut invocation = CREATE.key(self.session_key(key));
        invocation.arg(Self::create_args(key, record));
        self.backend
            .run(self.timeout, |mut conn| async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await
            .map(drop)
            .map_err(StoreError::from)
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let redis_key = self.session_key(key);
        let mut invocation = UPDATE.key(redis_key);
        let (set, remove) = Self::patch_fields(patch);
        invocation
            .arg(set.len())
            .arg(remove.len())
            .arg(super::unix_millis(std::time::SystemTime::now()));
        for (name, value) in &set {
            invocation.arg(name).arg(value);
        }
        invocation.arg(remove);
        let applied: i64 = self
            .backend
            .run(self.timeout, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await
            .map_err(StoreError::from)?;
        Ok(if applied == 1 {
            Written::Applied
        } else {
            Written::Missing
        })
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        // One round trip, in order: the new record exists before the old one goes.
        let mut pipe = redis::pipe();
        self.push_create(&mut pipe, new, record);
        self.push_delete(&mut pipe, old, old_user);
        let (removed,): (i64,) = self.query(pipe).await?;
        if removed == 1 {
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
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("HMGET")
                .arg(self.session_key(key))
                .arg(CREATED)
                .arg(ABSOLUTE)
                .arg(USER);
        }
        let rows: Vec<(Option<u64>, Option<u64>, Option<String>)> = self.query(pipe).await?;
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
