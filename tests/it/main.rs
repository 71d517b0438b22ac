//! The integration tests, one crate: a module per area, sharing one build of `tests/support`
//! (the real-Redis harness) and of the reference app.
//!
//! The fault drills live in `tests/drills`, and `tests/metrics.rs` stays alone in its binary
//! (it installs a process-wide metrics recorder). Every module needs the `memory`, `redis` and
//! `axum` features (the crate's `required-features`); a module that needs more says so on its
//! `mod` line.

#[path = "../support/mod.rs"]
mod support;

// The example's `pub` items (and its re-exports) are its interface as a program; here they are
// a private module's.
#[cfg(all(
    feature = "sentinel",
    feature = "cluster",
    feature = "postgres",
    feature = "connections",
    feature = "metrics"
))]
#[allow(unreachable_pub, unused_imports)]
#[path = "../../examples/axum_app/main.rs"]
mod axum_app;

#[cfg(feature = "tls")]
mod backend;
#[cfg(all(
    feature = "sentinel",
    feature = "cluster",
    feature = "postgres",
    feature = "connections",
    feature = "metrics"
))]
mod connections;
mod hostile_input;
mod hyper_server;
#[cfg(feature = "postgres")]
mod postgres_store;
mod ratelimit_layer;
mod ratelimit_penalty;
mod ratelimit_settle;
#[cfg(feature = "cluster")]
mod ratelimit_store;
#[cfg(all(
    feature = "sentinel",
    feature = "cluster",
    feature = "postgres",
    feature = "connections",
    feature = "metrics"
))]
mod reference_app;
mod session_cap;
#[cfg(feature = "postgres")]
mod session_chain;
#[cfg(feature = "cluster")]
mod session_conformance;
mod session_copy;
#[cfg(feature = "cluster")]
mod session_events;
mod session_fallback;
mod session_layer;
#[cfg(feature = "postgres")]
mod session_migration;
mod session_restore;
#[cfg(feature = "connections")]
mod session_watch;
mod tenant;
#[cfg(feature = "tonic")]
mod tonic_server;
#[cfg(feature = "tower-sessions")]
mod tower_sessions;
