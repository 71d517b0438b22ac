//! The long fault drills, in a crate of their own: Redis (single, Cluster, Sentinel) killed and
//! restarted under load, and a flood of fresh keys. `cargo test --test it` runs without them;
//! `cargo test --test drills` runs them alone.

#[path = "../support/mod.rs"]
mod support;

// The example's `pub` items are its interface as a program; here they are a private module's,
// and the fault drill uses only `Config` and `build_parts` of them.
#[cfg(all(
    feature = "sentinel",
    feature = "cluster",
    feature = "postgres",
    feature = "connections",
    feature = "metrics"
))]
#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../../examples/axum_app/main.rs"]
mod axum_app;

#[cfg(feature = "cluster")]
mod cluster;
#[cfg(all(
    feature = "sentinel",
    feature = "cluster",
    feature = "postgres",
    feature = "connections",
    feature = "metrics"
))]
mod fault_drill;
mod key_flood;
#[cfg(feature = "sentinel")]
mod sentinel;
