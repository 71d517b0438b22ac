//! How soon one instance's write reaches another instance's local copy.
//!
//! Two `RedisStore`s with a local copy, A and B, each on a `RedisBackend` of its own (so each
//! has its own connection, tracking and copy, as two server processes would), in one process,
//! against the harness's Redis. One session, created by A.
//!
//! - **Delay** (`samples` of them): B loads the session and holds a copy (checked: a second
//!   load is served from it). Then `t0`; A's update is polled to completion while B's
//!   `local_copy_stats().invalidations` is looked at between polls, yielding to the runtime
//!   each time; `t_ack` when A's update returns; the looks go on until the counter moves, `t1`
//!   being the first look that saw it. Reported: `t1 − t0` and `t1 − t_ack` (negative when B
//!   had dropped its copy before A's write was acknowledged), and how many samples had the
//!   copy dropped by then. The looks keep a worker thread of the runtime busy, which is not
//!   how an idle server waits, and may let B handle the push sooner than it otherwise would.
//! - **Stale reads** (as many samples again, in a pass of their own, with no looks): B holds
//!   a copy, A's update returns, and B reads at once; a read without A's new value is stale.
//!   Redis queues the invalidation for B while it runs A's write, in the same event-loop turn
//!   as its reply to A, but B serves its copy until its connection's task has handled the
//!   push, so a read can come in between.
//!
//! Both stores share one runtime of two workers, as the crate's `session_copy` test does; in
//! two server processes each instance's runtime would handle its own connection.

use std::{
    collections::BTreeMap,
    future::{Future, poll_fn},
    pin::pin,
    task::Poll,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tower_turnstile::{
    backend::RedisBackend,
    session::{Patch, Record, RedisStore, SessionKey, SessionStore, Written},
    tenant::Tenant,
};

/// How long a sample waits for an invalidation before it counts as never seen.
const PATIENCE: Duration = Duration::from_secs(1);

/// What the measurement found.
#[derive(Debug, Clone)]
pub struct InvalidationDelay {
    /// Samples timed (B held a copy and the invalidation came within `PATIENCE`).
    pub timed: usize,
    /// From the start of A's update until B's copy was seen dropped, µs.
    pub from_write: Spread,
    /// From A's update returning until B's copy was seen dropped, µs (negative: before).
    pub after_ack: Spread,
    /// Samples whose copy was dropped by the time A's update returned.
    pub dropped_by_ack: usize,
    /// Samples where B held no copy after loading, or heard nothing within `PATIENCE`.
    pub untimed: usize,
    /// Reads by B, holding a copy, right after A's update returned.
    pub reads: usize,
    /// Those that did not see A's new value.
    pub stale_reads: usize,
}

/// p50, p99 and max of a set of durations, in µs.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| {
            let rank = (q * values.len() as f64).ceil() as usize;
            values
                .get(rank.clamp(1, values.len().max(1)) - 1)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    fn to_json(self) -> Value {
        json!({"p50_us": self.p50, "p99_us": self.p99, "max_us": self.max})
    }
}

impl InvalidationDelay {
    pub fn summary(&self) -> String {
        format!(
            "invalidation delay over {} samples: from A's write p50 {:.0} µs, p99 {:.0} µs, \
             max {:.0} µs; after A's acknowledgement p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; \
             dropped by the acknowledgement in {} of {}; untimed {}; stale reads {} of {}",
            self.timed,
            self.from_write.p50,
            self.from_write.p99,
            self.from_write.max,
            self.after_ack.p50,
            self.after_ack.p99,
            self.after_ack.max,
            self.dropped_by_ack,
            self.timed,
            self.untimed,
            self.stale_reads,
            self.reads
        )
    }

    /// The report's section.
    pub fn to_markdown(&self) -> String {
        let mut md = format!(
            "\nInvalidation delay between two instances: two `RedisStore`s with a local copy, on \
             separate backends, in one process (one runtime of two workers), on the harness's \
             Redis. Per sample B loads the session and holds a copy, A updates it, and B's \
             count of dropped copies is looked at between polls of A's update and after it, \
             until it moves (the looks keep a worker busy). {} samples timed, {} untimed (B held \
             no copy, or heard nothing within 1 s).\n\n| from | p50 µs | p99 µs | max µs |\n\
             | --- | ---: | ---: | ---: |\n",
            self.timed, self.untimed
        );
        for (label, spread) in [
            ("the start of A's write", self.from_write),
            ("A's write returning (negative: before)", self.after_ack),
        ] {
            md += &format!(
                "| {label} | {:.0} | {:.0} | {:.0} |\n",
                spread.p50, spread.p99, spread.max
            );
        }
        md += &format!(
            "\nB's copy was already dropped when A's write returned in {} of {} samples. Stale \
             reads (B, holding a copy, reads right after A's write returns, in a pass of its own \
             with no looks): {} of {}.\n",
            self.dropped_by_ack, self.timed, self.stale_reads, self.reads
        );
        md
    }

    pub fn to_json(&self) -> Value {
        json!({
            "timed_samples": self.timed,
            "untimed_samples": self.untimed,
            "from_write": self.from_write.to_json(),
            "after_ack": self.after_ack.to_json(),
            "dropped_by_ack": self.dropped_by_ack,
            "reads_after_ack": self.reads,
            "stale_reads": self.stale_reads,
        })
    }
}

/// Measures `samples` invalidations and `samples` reads right after a write, on the Redis at
/// `redis_url`.
pub fn measure(redis_url: &str, samples: usize) -> InvalidationDelay {
    // Two workers, as on a small server: while one spins on B's counter, the other runs the
    // connections' tasks.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
        .block_on(run(redis_url, samples))
}

async fn run(redis_url: &str, samples: usize) -> InvalidationDelay {
    let instance = || {
        RedisStore::new(RedisBackend::new(redis_url).expect("a valid Redis URL"))
            .with_key_prefix("delay:")
            .with_local_copy(RedisStore::SUGGESTED_COPY_CAPACITY)
    };
    let (a, b) = (instance(), instance());
    let key = random_key();
    a.create(&key, &record()).await.expect("create the session");

    let (mut from_write, mut after_ack) = (Vec::new(), Vec::new());
    let (mut dropped_by_ack, mut untimed) = (0, 0);
    for sample in 0..samples {
        if !holds_copy(&b, &key).await {
            untimed += 1;
            continue;
        }
        let Some(timing) = time_invalidation(&a, &b, &key, &set_n(sample)).await else {
            untimed += 1;
            continue;
        };
        from_write.push(micros(timing.t1 - timing.t0));
        after_ack.push(if timing.t1 >= timing.t_ack {
            micros(timing.t1 - timing.t_ack)
        } else {
            dropped_by_ack += 1;
            -micros(timing.t_ack - timing.t1)
        });
    }

    let (mut reads, mut stale_reads) = (0, 0);
    for sample in samples..2 * samples {
        if !holds_copy(&b, &key).await {
            continue;
        }
        reads += 1;
        let written = a.update(&key, &set_n(sample)).await;
        assert_eq!(written.expect("A's update"), Written::Applied);
        let read = b.load(&key).await.expect("B's read").expect("the session");
        if read.data.get("n") != Some(&sample.to_string()) {
            stale_reads += 1;
        }
    }
    a.delete(&key, None).await.expect("delete the session");

    InvalidationDelay {
        timed: from_write.len(),
        from_write: Spread::of(from_write),
        after_ack: Spread::of(after_ack),
        dropped_by_ack,
        untimed,
        reads,
        stale_reads,
    }
}

struct Timing {
    t0: Instant,
    t_ack: Instant,
    t1: Instant,
}

/// A's `patch`, timed against B's counter of dropped copies; `None` if B heard nothing within
/// `PATIENCE`.
async fn time_invalidation(
    a: &RedisStore,
    b: &RedisStore,
    key: &SessionKey,
    patch: &Patch,
) -> Option<Timing> {
    let before = b.local_copy_stats().invalidations;
    let dropped = || b.local_copy_stats().invalidations > before;
    let t0 = Instant::now();
    let mut update = pin!(a.update(key, patch));
    let mut t1 = None;
    let written = loop {
        if t1.is_none() && dropped() {
            t1 = Some(Instant::now());
        }
        // One poll of A's update, then a look at B again.
        let polled = poll_fn(|cx| Poll::Ready(update.as_mut().poll(cx))).await;
        if let Poll::Ready(written) = polled {
            break written;
        }
        tokio::task::yield_now().await;
    };
    let t_ack = Instant::now();
    assert_eq!(written.expect("A's update"), Written::Applied);
    while t1.is_none() {
        if dropped() {
            t1 = Some(Instant::now());
        } else if t_ack.elapsed() > PATIENCE {
            return None;
        } else {
            tokio::task::yield_now().await;
        }
    }
    Some(Timing { t0, t_ack, t1: t1? })
}

/// Loads the session on `store`, then checks that a second load is served from its copy.
async fn holds_copy(store: &RedisStore, key: &SessionKey) -> bool {
    store.load(key).await.expect("a load").expect("the session");
    let hits = store.local_copy_stats().hits;
    store.load(key).await.expect("a load").expect("the session");
    store.local_copy_stats().hits > hits
}

fn random_key() -> SessionKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("random bytes");
    SessionKey::from_hash(&Tenant::default(), &URL_SAFE_NO_PAD.encode(bytes))
        .expect("32 bytes in base64url are a session hash")
}

fn record() -> Record {
    let mut record = Record::new(Duration::from_secs(3600), Duration::from_secs(24 * 3600));
    record.data = BTreeMap::from([("n".to_owned(), "0".to_owned())]);
    record
}

fn set_n(n: usize) -> Patch {
    let mut patch = Patch::default();
    patch.set.push(("n".to_owned(), n.to_string()));
    patch
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
