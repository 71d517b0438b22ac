//! The commands of one operation whose keys may live on different nodes: one pipeline on a
//! server, one per hash slot on a cluster.
//!
//! A store writes an operation once, as [`Part`]s: each part touches the keys of one hash slot
//! (one key, or keys sharing a `{hash tag}`). On a single server (or a Sentinel's master) the
//! parts go as one pipeline, in one round trip; on a Redis Cluster, where a pipeline must keep
//! to one slot, each part goes as its own pipeline, the parts of a stage at the same time, so
//! the operation still waits for about one round trip per stage. Nothing else in the crate asks
//! what kind of Redis it talks to.

use std::time::Duration;

use futures_util::future::try_join_all;
use redis::{Cmd, Value};

use super::{BackendError, RedisBackend};

/// The commands of one operation, in parts and stages; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Parts in stages: on a cluster, a stage is sent once every part of the one before has
    /// answered.
    stages: Vec<Vec<Part>>,
}

/// Commands touching keys of one hash slot.
#[derive(Debug, Default)]
pub(crate) struct Part {
    commands: Vec<Cmd>,
    atomic: bool,
}

impl Part {
    /// A part of plain commands.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A part run as one transaction (`MULTI` … `EXEC`). On a server, a batch with any atomic
    /// part runs whole as one transaction.
    pub(crate) fn atomic() -> Self {
        Self {
            commands: Vec::new(),
            atomic: true,
        }
    }

    /// Adds a command.
    pub(crate) fn add(&mut self, command: Cmd) -> &mut Self {
        self.commands.push(command);
        self
    }

    /// Adds a command named `name`, to be given its arguments.
    pub(crate) fn cmd(&mut self, name: &str) -> &mut Cmd {
        self.commands.push(redis::cmd(name));
        self.commands.last_mut().expect("a command was just pushed")
    }

    /// Whether the part holds no command.
    pub(crate) fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

impl Batch {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `part` to the current stage; returns its index among the batch's parts (their
    /// replies come back in this order). An empty part sends nothing and has no replies.
    pub(crate) fn push(&mut self, part: Part) -> usize {
        let index = self.stages.iter().map(Vec::len).sum();
        if self.stages.is_empty() {
            self.stages.push(Vec::new());
        }
        self.stages.last_mut().expect("a stage exists").push(part);
        index
    }

    /// Parts added from now on run after the earlier ones have answered (on a cluster; on a
    /// server the whole batch is one pipeline anyway).
    pub(crate) fn then(&mut self) {
        if self.stages.last().is_some_and(|stage| !stage.is_empty()) {
            self.stages.push(Vec::new());
        }
    }

    /// How many parts send something.
    fn requests(&self) -> usize {
        self.stages
            .iter()
            .flatten()
            .filter(|part| !part.is_empty())
            .count()
    }
}

/// The replies of a batch: one list per part, in the order the parts were added.
#[derive(Debug)]
pub(crate) struct Replies(Vec<Vec<Value>>);

impl Replies {
    /// The replies of the part at `index`, one per command; empty for an index past the end.
    pub(crate) fn part(&self, index: usize) -> &[Value] {
        self.0.get(index).map_or(&[], Vec::as_slice)
    }
}

impl RedisBackend {
    /// Whether `batch` goes to Redis as more than one request (more than one part, on a
    /// cluster): its parts may then succeed or fail apart, and an operation that must not be
    /// left half done undoes what it can.
    pub(crate) fn splits(&self, batch: &Batch) -> bool {
        self.is_cluster() && batch.requests() > 1
    }

    /// Runs `batch` under `deadline` (each request's): on a server in one round trip, on a
    /// cluster one request per part, stage after stage. Fails if any part fails.
    pub(crate) async fn run_batch(
        &self,
        deadline: Duration,
        batch: Batch,
    ) -> Result<Replies, BackendError> {
        if self.is_cluster() {
            let mut replies = Vec::new();
            for stage in batch.stages {
                let runs = stage.into_iter().map(|part| async move {
                    if part.is_empty() {
                        return Ok(vec![Vec::new()]);
                    }
                    self.run_parts(deadline, vec![part]).await
                });
                replies.extend(try_join_all(runs).await?.into_iter().flatten());
            }
            return Ok(Replies(replies));
        }
        let parts = batch.stages.into_iter().flatten().collect();
        Ok(Replies(self.run_parts(deadline, parts).await?))
    }

    /// One round trip: `parts` as one pipeline, atomic if any part is; the replies split back
    /// per part.
    async fn run_parts(
        &self,
        deadline: Duration,
        parts: Vec<Part>,
    ) -> Result<Vec<Vec<Value>>, BackendError> {
        let mut pipe = redis::pipe();
        if parts.iter().any(|part| part.atomic) {
            pipe.atomic();
        }
        let sizes: Vec<usize> = parts.iter().map(|part| part.commands.len()).collect();
        if sizes.iter().all(|&size| size == 0) {
            return Ok(sizes.iter().map(|_| Vec::new()).collect());
        }
        for command in parts.into_iter().flat_map(|part| part.commands) {
            pipe.add_command(command);
        }
        let replies: Vec<Value> = self
            .run(deadline, |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        let mut replies = replies.into_iter();
        Ok(sizes
            .into_iter()
            .map(|size| replies.by_ref().take(size).collect())
            .collect())
    }
}
