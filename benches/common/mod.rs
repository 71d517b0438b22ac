//! What the benches share: reading criterion's estimates back to print ratios.

use std::path::PathBuf;

/// The mean time (ns) criterion measured for `name` in `group` during this run.
pub(crate) fn estimate(group: &str, name: &str) -> Option<f64> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let path = target
        .join("criterion")
        .join(group.replace('/', "_"))
        .join(name)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}
