//! The blocks feed: each block a check places is announced on one capped stream, which every
//! layer with a penalty reads, so all instances refuse a blocked key from memory.

use std::{sync::LazyLock, time::Duration};

use redis::{Script, Value};

use super::RedisRateStore;
use crate::{
    ratelimit::store::{Block, Blocks, Client, CounterKey, StoreError},
    tenant::Tenant,
};

/// The entries a stream keeps: far more blocks than are ever placed within a read's delay.
const KEPT: usize = 10_000;
/// Entries read per round trip.
const PER_READ: usize = 1_000;

/// A stream entry: its id and its fields.
type Entry = (String, Vec<(String, String)>);

/// Redis's time and the entries past a cursor, in one round trip on the stream's node.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local time = redis.call('TIME')
local now = string.format('%.0f', tonumber(time[1]) * 1000000 + tonumber(time[2]))
local start = '-'
if ARGV[1] ~= '' then
  start = '(' .. ARGV[1]
end
return {now, redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[2])}
",
    )
});

impl RedisRateStore {
    fn feed_key(&self) -> String {
        format!("{}blocks", self.prefix)
    }

    /// Adds a block of `key` (under a limit of `limit`) that ends at `until` (Redis µs) to the
    /// feed. A failure is logged and otherwise ignored: the block holds in Redis all the same,
    /// and each instance learns of it at its next check of the key.
    pub(super) async fn announce(&self, key: &CounterKey, limit: u64, until: u64) {
        let (kind, client) = match key.client() {
            Client::Address(ip) => ("a", ip.to_string()),
            Client::Text(text) => ("t", text.to_string()),
        };
        let mut add = redis::cmd("XADD");
        add.arg(self.feed_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(KEPT)
            .arg("*")
            .arg("t")
            .arg(key.tenant().as_str())
            .arg("s")
            .arg(key.scope())
            .arg("k")
            .arg(kind)
            .arg("c")
            .arg(client)
            .arg("l")
            .arg(limit)
            .arg("u")
            .arg(until);
        let added = self.backend.query::<Value>(self.timeout, add).await;
        if let Err(error) = added {
            tracing::warn!(target: "tower_turnstile::ratelimit", %error, "a penalty block was placed but not announced");
        }
    }

    /// The blocks announced past `cursor` that still hold.
    pub(super) async fn read_blocks(&self, cursor: Option<String>) -> Result<Blocks, StoreError> {
        let mut read = READ.key(self.feed_key());
        read.arg(cursor.as_deref().unwrap_or_default())
            .arg(PER_READ);
        let reply = self.run(read).await?;
        let (now, entries): (u64, Vec<Entry>) =
            redis::from_redis_value(reply).map_err(|error| StoreError::Failed {
                source: format!("unexpected blocks feed reply: {error}").into(),
            })?;
        let cursor = entries.last().map(|(id, _)| id.clone()).or(cursor);
        let blocks = entries
            .into_iter()
            .filter_map(|(_, fields)| block_of(&fields, now))
            .collect();
        Ok(Blocks::new(blocks, cursor))
    }
}

/// The block an entry announces, if it is well formed and still holds at `now` (Redis µs).
fn block_of(fields: &[(String, String)], now: u64) -> Option<Block> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let until: u64 = field("u")?.parse().ok()?;
    let left = until.checked_sub(now).filter(|&left| left > 0)?;
    let client = match field("k")? {
        "a" => Client::Address(field("c")?.parse().ok()?),
        "t" => Client::from(field("c")?),
        _ => return None,
    };
    let tenant = Tenant::new(field("t")?).ok()?;
    let key = CounterKey::new(tenant, field("s")?, client);
    Some(Block::new(
        key,
        field("l")?.parse().ok()?,
        Duration::from_micros(left),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn entries_read_as_blocks_that_still_hold_and_garbage_reads_as_none() {
        let good = fields(&[
            ("t", "acme"),
            ("s", "per-ip:sliding-window"),
            ("k", "a"),
            ("c", "203.0.113.7"),
            ("l", "10"),
            ("u", "5000"),
        ]);
        let block = block_of(&good, 2000).expect("a block");
        assert_eq!(block.left, Duration::from_millis(3));
        assert_eq!(block.limit, 10);
        assert_eq!(
            block.key.to_string(),
            "acme:rl:per-ip:sliding-window:203.0.113.7"
        );
        // Ended, or any field missing or malformed: no block.
        assert!(block_of(&good, 5000).is_none());
        for (name, bad) in [
            ("k", "x"),
            ("c", "not an ip"),
            ("t", "Not A Tenant!"),
            ("u", "-1"),
            ("l", "ten"),
        ] {
            let mut broken = good.clone();
            broken.iter_mut().find(|(k, _)| k == name).unwrap().1 = bad.to_owned();
            assert!(block_of(&broken, 2000).is_none(), "{name}={bad}");
        }
        assert!(block_of(&good[1..], 2000).is_none());
    }
}
