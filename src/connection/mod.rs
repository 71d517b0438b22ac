//! Live connections across instances: which user is connected where, delivery to every
//! connection of a user on every instance, and caps on concurrent connections.
//!
//! A [`Registry`] is one instance's view. Each live connection (a WebSocket, an SSE stream, a
//! gRPC stream) is registered with [`Registry::register`], which hands back a
//! [`Registration`]: the connection's inbox, deregistered when dropped.
//!
//! - **In Redis**, each user's connections are a sorted set of leases: a member per connection
//!   (`instance/id`), scored by the time its lease ends, on Redis's clock. The instance renews
//!   the leases of its connections every third of the lease (default lease: 30 s), so the
//!   entries of an instance that dies without a word vanish by themselves within one lease. All
//!   keys of one user share a hash tag, so the store works on a Redis Cluster.
//! - **Delivery**: [`Registry::send_to_user`] hands the message to this instance's connections
//!   of that user at once, and appends it to the inbox stream of every other instance that has
//!   one; each instance reads its inbox every 20 ms (by default). The guarantee is *at most
//!   once, to connections live when the message is sent*: a message for an instance that dies
//!   before reading it is lost with its connections.
//! - **Caps**: [`Registry::register_capped`] admits a connection only while the user has fewer
//!   than `max` live ones on all instances, decided atomically in Redis, so concurrent
//!   connects on several instances let exactly `max` in. A slot frees when its registration is
//!   dropped, or when its instance dies, one lease later. [`InFlightLimitLayer`](crate::ratelimit::InFlightLimitLayer) does the
//!   same for requests in flight, per client address or any key, answering `429` with the
//!   `RateLimit` fields of a `concurrent-requests` quota.
//! - **Sessions**: [`Registry::register_for_session`] binds a connection to the session that
//!   opened it; when that session ends ([`SessionLayer::on_session_end`](crate::session::SessionLayer::on_session_end)
//!   with the registry announces it), the connection gets [`Event::SessionEnded`] on whichever
//!   instance holds it.
//! - **Draining**: [`Registry::drain`] refuses new registrations, tells every local connection
//!   to reconnect elsewhere ([`Event::Reconnect`]; a WebSocket closes with 1012 "service
//!   restart"), and removes this instance's entries from Redis at once.
//! - **While Redis is down** the registry is local: registrations succeed (a cap counts this
//!   instance's connections only), delivery reaches this instance's connections only, and the
//!   failures are logged. The next renewal after Redis returns registers every live connection
//!   again.
//!
//! ```no_run
//! use tower_turnstile::{backend::RedisBackend, connection::{Event, Registry}, tenant::Tenant};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(RedisBackend::new("redis://127.0.0.1:6379")?)?;
//! let tenant = Tenant::default();
//! let mut connection = registry.register_capped(&tenant, "alice", "{}", 5).await?;
//! // Anywhere, on any instance:
//! registry.send_to_user(&tenant, "alice", "hello").await;
//! while let Some(event) = connection.next().await {
//!     match event {
//!         Event::Message(text) => println!("{text}"),
//!         // `Event::Reconnect`: this instance is stopping.
//!         _ => break,
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod delivery;
mod keys;
mod registration;
mod registry;
mod sessions;
mod tasks;

pub use registration::Registration;
pub use registry::{ConnectionInfo, Event, RegisterError, Registry, RegistryBuilder};
pub use sessions::SessionWatch;
#[cfg(fuzzing)]
pub(crate) use {keys::parse_member, tasks::stream_entries};
