//! What the benches share: reading criterion's estimates back to print ratios.

use std::{path::PathBuf, sync::OnceLock, time::SystemTime};

static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Marks the start of this run: estimates written before it (a run with a filter that left a
/// benchmark out) are not read back as if measured now.
pub(crate) fn start() {
    STARTED.get_or_init(SystemTime::now);
}

/// The mean time (ns) criterion measured for `name` in `group` during this run.
pub(crate) fn estimate(group: &str, name: &str) -> Option<f64> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let path = target
        .join("criterion")
        .join(group.replace('/', "_"))
        .join(name)
        .join("new/estimates.json");
    let written = std::fs::metadata(&path).ok()?.modified().ok()?;
    if STARTED.get().is_some_and(|started| written < *started) {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}
