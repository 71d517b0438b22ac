//! Reading a session: from the instance's copy when it holds a current one, else from Redis in
//! one round trip; and restarting the inactivity expiry only when it is due.

use std::time::SystemTime;

use redis::{Pipeline, Value};

use super::{
    RedisStore,
    copy::{Lookup, slide_due},
    layout::{self, Corrupt},
    sized,
};
use crate::{
    session::store::{Record, SessionKey, StoreError},
    time::millis,
};

/// What a read found under a session's key.
pub(super) enum Fetched {
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
    pub(super) fn into_fields(self) -> Option<Vec<(String, String)>> {
        match self {
            Self::Live { fields, .. } => fields,
            Self::Missing | Self::Corrupt(_) => None,
        }
    }
}

impl RedisStore {
    /// The session under `key` from the instance's copy, when it holds a current one: no round
    /// trip, or one when the inactivity expiry is due to be restarted. `None` when Redis must
    /// be asked.
    pub(super) async fn held(&self, redis_key: &str) -> Option<Result<Option<Record>, StoreError>> {
        if !self.serves_copy() {
            return None;
        }
        match self.copy().lookup(redis_key) {
            Lookup::Absent => None,
            Lookup::Current {
                record,
                slide: None,
            } => Some(Ok(Some(record))),
            Lookup::Current {
                record,
                slide: Some(ttl),
            } => Some(match self.slide(redis_key, ttl).await {
                Ok(Some(expires)) => {
                    self.copy().slid(redis_key, expires);
                    Ok(Some(record))
                }
                Ok(None) => {
                    self.copy().forget(redis_key);
                    Ok(None)
                }
                Err(error) => Err(error),
            }),
        }
    }

    /// Before a write of a whole session that the copy is to hold: turns `CLIENT TRACKING` on
    /// for the connection when no read has in this tracking epoch, so that Redis tells this
    /// instance of later changes to what the write reads back. One round trip, once per
    /// connection; a refusal (an ACL without `client`) leaves the copy off, as on a read.
    pub(super) async fn ensure_tracking(&self) {
        if !self.keeps_copy() {
            return;
        }
        let copy = self.copy();
        let epoch = copy.tracking().epoch();
        if copy.tracks(epoch) {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("TRACKING").arg("ON").arg("NOLOOP");
        match self.query_hash::<Vec<Value>>(pipe).await {
            Ok(Some(replies)) if matches!(replies.first(), Some(Value::Okay)) => {
                copy.tracking_on(epoch);
            }
            Ok(_) => copy.refuse(),
            // Redis did not answer: the write that follows fails and says why.
            Err(_) => {}
        }
    }

    /// Reads a session from Redis in one round trip (`TIME`, `HGETALL`, `PTTL`), and restarts
    /// its inactivity expiry in a second only when that is due. The instance's copy holds what
    /// it read unless another client changed the session meanwhile. The hash's fields are kept
    /// beside the record only when `keep_fields` (the fallback's replays). `redis_key` is
    /// `key`'s name in Redis, which the caller has already built.
    pub(super) async fn fetch(
        &self,
        key: &SessionKey,
        redis_key: &str,
        keep_fields: bool,
    ) -> Result<Fetched, StoreError> {
        let fill = self.keeps_copy().then(|| self.copy().fill(redis_key));
        // Once per connection (tracking epoch), on it, before the read: tell us when another
        // client changes what we read, and stay silent about our own writes (see
        // `backend::tracking`). A reconnect moves the epoch, so the next read turns it on
        // again, and a copy read before that is unconfirmed.
        let turn_on = fill
            .as_ref()
            .is_some_and(|fill| !self.copy().tracks(fill.epoch()));
        let sent = SystemTime::now();
        let pipe = read_pipeline(redis_key, turn_on);
        let Some(replies) = self.query_hash::<Vec<Value>>(pipe).await? else {
            return Ok(Fetched::Corrupt(Corrupt::Shape));
        };
        let tracked = !turn_on || matches!(replies.first(), Some(Value::Okay));
        if let Some(fill) = &fill
            && turn_on
            && tracked
        {
            self.copy().tracking_on(fill.epoch());
        }
        let Some((now, hash, pttl)) = split_read(replies) else {
            return Ok(Fetched::Corrupt(Corrupt::Shape));
        };
        self.copy().tracking().observed_time(now, sent);
        let fetched = self.live(key, redis_key, hash, now, keep_fields).await;
        let Fetched::Live { record, .. } = &fetched else {
            if let Some(fill) = fill {
                fill.vacate(self.copy());
            }
            return Ok(fetched);
        };
        // A key without a TTL counts as one that ends now: the slide gives it one.
        let mut expires = u64::try_from(pttl).map_or(now, |pttl| now.saturating_add(pttl));
        if slide_due(&record.lifetime(), expires, now) {
            match self.slide(redis_key, millis(record.ttl_at(now))).await? {
                Some(slid) => expires = slid,
                None => {
                    self.copy().forget(redis_key);
                    return Ok(Fetched::Missing);
                }
            }
        }
        match fill {
            Some(fill) if tracked => fill.hold(record, expires),
            Some(fill) => {
                self.copy().refuse();
                fill.vacate(self.copy());
            }
            None => {}
        }
        Ok(fetched)
    }

    /// The session in the hash Redis answered, or why there is none (removing what is dead).
    async fn live(
        &self,
        key: &SessionKey,
        redis_key: &str,
        hash: Value,
        now: u64,
        keep_fields: bool,
    ) -> Fetched {
        let fields = match layout::hash_fields(hash) {
            Ok(fields) if fields.is_empty() => return Fetched::Missing,
            // What a save to a gone session left: no session, removed.
            Ok(fields) if !fields.iter().any(|(name, _)| name.starts_with("m:")) => {
                self.remove_dead(redis_key).await;
                return Fetched::Missing;
            }
            Ok(fields) => fields,
            Err(problem) => return Fetched::Corrupt(problem),
        };
        let kept = keep_fields.then(|| fields.clone());
        let (record, tenant) = match layout::parse_record(fields) {
            Ok(parsed) => parsed,
            Err(problem) => return Fetched::Corrupt(problem),
        };
        // The key already carries the tenant; this guards against a record copied under
        // another one.
        if tenant != key.tenant().as_str() {
            return Fetched::Missing;
        }
        self.idle_vote.vote(millis(record.inactivity_timeout));
        if record.ttl_at(now).is_zero() {
            self.remove_dead(redis_key).await;
            return Fetched::Missing;
        }
        Fetched::Live {
            record,
            fields: kept,
        }
    }

    /// Restarts a session's inactivity expiry: `ttl` ms from now. One round trip, one
    /// transaction that reads the key again after changing it, so that Redis keeps telling this
    /// instance of other clients' changes. The key's new end (Redis's clock, Unix ms), or
    /// `None` when the session is gone.
    pub(super) async fn slide(&self, redis_key: &str, ttl: u64) -> Result<Option<u64>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("PEXPIRE").arg(redis_key).arg(ttl.max(1));
        pipe.cmd("PTTL").arg(redis_key);
        let (existed, pttl): (i64, i64) = self.query(pipe).await?;
        let now = self.copy().now();
        Ok((existed == 1).then(|| now.saturating_add(u64::try_from(pttl).unwrap_or(0))))
    }
}

/// A read of the session under `redis_key`: `TIME`, `HGETALL`, `PTTL`, after
/// `CLIENT TRACKING ON NOLOOP` when `turn_on`.
fn read_pipeline(redis_key: &str, turn_on: bool) -> Pipeline {
    let mut pipe = Pipeline::with_capacity(4);
    if turn_on {
        pipe.cmd("CLIENT").arg("TRACKING").arg("ON").arg("NOLOOP");
    }
    pipe.add_command(sized(&["TIME"]));
    pipe.add_command(sized(&["HGETALL", redis_key]));
    pipe.add_command(sized(&["PTTL", redis_key]));
    pipe
}

/// The read's last three replies: Redis's time (Unix ms), the hash, and its `PTTL`.
fn split_read(mut replies: Vec<Value>) -> Option<(u64, Value, i64)> {
    let (Some(pttl), Some(hash), Some(time)) = (replies.pop(), replies.pop(), replies.pop()) else {
        return None;
    };
    let ((seconds, micros), pttl) =
        redis::from_redis_value::<((u64, u64), i64)>(Value::Array(vec![time, pttl])).ok()?;
    Some((seconds * 1000 + micros / 1000, hash, pttl))
}
