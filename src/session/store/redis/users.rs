//! A user's sessions: the index that lists them, ending them all, and the per-user cap, which
//! one script decides atomically on the user's logins (`lua/cap.lua`).

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{
    RedisStore,
    layout::{ABSOLUTE, CREATED, USER},
};
use crate::{
    backend::{Batch, Part},
    session::id::SessionId,
    session::store::{SessionInfo, SessionKey, StoreError, UserKey},
    time::{from_unix_millis, now_millis, unix_millis},
};

static CAP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/cap.lua")));

/// A fresh name for a place held for a login (`p:` and the hash of a random id).
pub(super) fn place_name(user: &UserKey) -> String {
    let random = SessionId::random().map(|id| id.key(user.tenant()).hash());
    format!("p:{}", random.unwrap_or_else(|| now_millis().to_string()))
}

/// The score of an ended session in a user's logins: minus the time it ended (Unix ms), so
/// that it is no longer counted, and no listing taken before it ended counts it again, until
/// `lua/cap.lua` forgets it a minute later.
pub(super) fn ended_mark() -> String {
    format!("-{}", now_millis())
}

/// A user's sessions as the index lists them: the live ones, and the hashes of index entries
/// whose session is gone (or belongs to someone else now).
struct Listed {
    live: Vec<SessionInfo>,
    gone: Vec<String>,
}

impl RedisStore {
    pub(super) async fn members(&self, index: &str) -> Result<Vec<String>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(index);
        let (members,): (Vec<String>,) = self.query(pipe).await?;
        Ok(members)
    }

    /// The live sessions of `user`, with the index's entries of gone sessions taken out.
    pub(super) async fn user_sessions(
        &self,
        user: &UserKey,
    ) -> Result<Vec<SessionInfo>, StoreError> {
        let Listed { live, gone } = self.listed(user).await?;
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("SREM")
                .arg(self.keys.user(user))
                .arg(&gone)
                .ignore();
            pipe.cmd("ZADD").arg(self.keys.logins(user)).arg("XX");
            for hash in gone {
                pipe.arg(ended_mark()).arg(hash);
            }
            pipe.ignore();
            // Pruning is housekeeping: the listing is right whether or not it lands.
            let _ = self.query::<()>(pipe).await;
        }
        Ok(live)
    }

    /// What the index of `user` lists, each session read for its creation, end and owner.
    async fn listed(&self, user: &UserKey) -> Result<Listed, StoreError> {
        let keys: Vec<SessionKey> = self
            .members(&self.keys.user(user))
            .await?
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect();
        if keys.is_empty() {
            return Ok(Listed {
                live: Vec::new(),
                gone: Vec::new(),
            });
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
        let (mut live, mut gone) = (Vec::new(), Vec::new());
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
        Ok(Listed { live, gone })
    }

    /// Ends every session of `user`; how many there were.
    pub(super) async fn end_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let index = self.keys.user(user);
        let members = self.members(&index).await?;
        if members.is_empty() {
            return Ok(0);
        }
        let keys: Vec<SessionKey> = members
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect();
        self.delete_sessions(user, &keys, &members).await
    }

    /// Removes the sessions `keys` and the members `members` of `user`'s index and logins
    /// (only those: a session indexed meanwhile keeps its entry); returns how many sessions
    /// were removed.
    pub(super) async fn delete_sessions(
        &self,
        user: &UserKey,
        keys: &[SessionKey],
        members: &[String],
    ) -> Result<usize, StoreError> {
        let mut batch = Batch::new();
        for key in keys {
            let redis_key = self.keys.session(key);
            self.copy().forget(&redis_key);
            let mut part = Part::new();
            part.cmd("DEL").arg(redis_key);
            batch.push(part);
        }
        let mut unindex = Part::new();
        unindex.cmd("SREM").arg(self.keys.user(user)).arg(members);
        let unindexed = batch.push(unindex);
        if !members.is_empty() {
            let mut unrank = Part::new();
            let mark = unrank.cmd("ZADD").arg(self.keys.logins(user)).arg("XX");
            for member in members {
                mark.arg(ended_mark()).arg(member);
            }
            batch.push(unrank);
        }
        let replies = self.run(batch).await?;
        let removed = (0..unindexed)
            .filter(|&part| matches!(replies.part(part).first(), Some(Value::Int(1))))
            .count();
        Ok(removed)
    }

    /// The sessions a login of `user` into `login` ends so that at most `max` stay live:
    /// listed first, then decided in one script on the user's logins, so that concurrent
    /// logins on any instances each end different sessions and together leave `max`. `held`
    /// is the place [`hold`](Self::hold) took for this login, given back now.
    pub(super) async fn over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
        held: Option<&str>,
    ) -> Result<Vec<SessionKey>, StoreError> {
        let ended: Vec<String> = self
            .decide_cap(user, "end", Some(login), max, held.unwrap_or_default())
            .await?;
        Ok(ended
            .iter()
            .filter_map(|hash| SessionKey::from_hash(user.tenant(), hash))
            .collect())
    }

    /// Before a login of `user` (from the session `login`, if stored) under a refusing cap:
    /// whether the user has room, a place then held for the login under `place` (in one
    /// script, so that of concurrent logins no more pass than there is room for).
    pub(super) async fn hold(
        &self,
        user: &UserKey,
        login: Option<&SessionKey>,
        max: usize,
        place: &str,
    ) -> Result<bool, StoreError> {
        let admitted: i64 = self.decide_cap(user, "hold", login, max, place).await?;
        Ok(admitted == 1)
    }

    /// Lists `user`'s sessions, then runs `lua/cap.lua` in `mode` on the user's logins.
    async fn decide_cap<T: redis::FromRedisValue + Send + 'static>(
        &self,
        user: &UserKey,
        mode: &str,
        login: Option<&SessionKey>,
        max: usize,
        place: &str,
    ) -> Result<T, StoreError> {
        let Listed { live, gone } = self.listed(user).await?;
        let created = live
            .iter()
            .find(|info| Some(&info.key) == login)
            .map_or_else(now_millis, |info| unix_millis(info.created_at));
        let until = live
            .iter()
            .map(|info| unix_millis(info.expires_at))
            .max()
            .unwrap_or_else(|| now_millis() + 24 * 3600 * 1000);
        let mut invocation = CAP.key(self.keys.logins(user));
        invocation
            .arg(mode)
            .arg(max)
            .arg(login.map(SessionKey::hash).unwrap_or_default())
            .arg(created)
            .arg(until)
            .arg(place)
            .arg(gone.len())
            .arg(&gone);
        for info in &live {
            invocation
                .arg(unix_millis(info.created_at))
                .arg(info.key.hash());
        }
        Ok(self
            .backend
            .run(self.timeout, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?)
    }
}
