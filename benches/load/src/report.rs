//! The report: medians per scenario, ratios taken within each round, and a plot.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde_json::json;

use crate::{
    comparisons,
    delay::InvalidationDelay,
    measure::{Ceiling, CopyCounts, RunResult},
    scenario::SCENARIOS,
};

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

pub fn find<'a>(round: &'a [RunResult], name: &str) -> Option<&'a RunResult> {
    round.iter().find(|r| r.scenario == name)
}

/// Writes `results.json`, `report.md` and `ratios.svg` into `out`.
pub fn write(
    out: &Path,
    rounds: &[Vec<RunResult>],
    ceiling: &[Ceiling],
    delay: Option<&InvalidationDelay>,
    versions: &BTreeMap<String, String>,
    command: &str,
) {
    let names: Vec<String> = SCENARIOS
        .iter()
        .map(|s| s.name())
        .filter(|name| rounds.iter().any(|round| find(round, name).is_some()))
        .collect();
    let json = json!({
        "command": command,
        "versions": versions,
        "rounds": rounds.iter().map(|round| round.iter().map(RunResult::to_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "ceiling": ceiling.iter().map(|c| json!({"command": c.command, "rps": c.rps, "usec_per_call": c.usec_per_call})).collect::<Vec<_>>(),
        "invalidation_delay": delay.map(InvalidationDelay::to_json),
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write results.json");

    let mut md = String::new();
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(md, "| | |\n| --- | --- |");
    for (name, version) in versions {
        let _ = writeln!(md, "| {name} | {version} |");
    }
    let _ = writeln!(
        md,
        "\nMedians over {} rounds; each run in fresh server processes.\n",
        rounds.len()
    );
    if names.iter().any(|name| name.contains("-2x/")) {
        let _ = writeln!(md, "{SPREAD}\n");
    }
    let ratio_to_plain = scenario_table(&mut md, rounds, &names);
    comparisons::table(&mut md, rounds);
    commands_section(&mut md, rounds, &names);
    local_copy_section(&mut md, rounds, &names);
    if let Some(delay) = delay {
        md.push_str(&delay.to_markdown());
    }
    ceiling_section(&mut md, ceiling);
    std::fs::write(out.join("report.md"), md).expect("write report.md");
    std::fs::write(out.join("ratios.svg"), svg(&ratio_to_plain)).expect("write ratios.svg");
}

/// The main table, one row per scenario, with medians over rounds; returns each scenario's
/// requests/s as a share of plain axum's (the plot's bars).
fn scenario_table(
    md: &mut String,
    rounds: &[Vec<RunResult>],
    names: &[String],
) -> Vec<(String, f64)> {
    let _ = writeln!(
        md,
        "| scenario | req/s | p50 µs | p99 µs | server CPU µs/req | Redis CPU µs/req | Redis cmds/req | non-2xx | peak RSS MiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut ratio_to_plain = Vec::new();
    for name in names {
        let runs: Vec<&RunResult> = rounds.iter().filter_map(|r| find(r, name)).collect();
        let med = |f: &dyn Fn(&RunResult) -> f64| {
            median(&mut runs.iter().map(|r| f(r)).collect::<Vec<_>>())
        };
        let non_2xx: u64 = runs.iter().map(|r| r.non_2xx).sum();
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {:.1}% | {:.1} |",
            med(&|r| r.rps),
            med(&|r| r.p50_us),
            med(&|r| r.p99_us),
            med(&|r| r.server_cpu_us),
            med(&|r| r.redis_cpu_us),
            med(&|r| r.redis_commands),
            100.0 * non_2xx as f64 / requests.max(1) as f64,
            med(&|r| r.peak_rss_mib),
        );
        let mut per_round: Vec<f64> = rounds
            .iter()
            .filter_map(|round| Some(find(round, name)?.rps / find(round, "plain/read")?.rps))
            .collect();
        if !per_round.is_empty() {
            ratio_to_plain.push((name.clone(), median(&mut per_round)));
        }
    }

    ratio_to_plain
}

/// Redis commands per request, by command, medians over rounds.
fn commands_section(md: &mut String, rounds: &[Vec<RunResult>], names: &[String]) {
    let _ = writeln!(
        md,
        "\nRedis commands per request as `INFO commandstats` counts them (the commands a script runs are counted too; calls per request × Redis µs per call), medians:\n\n| scenario | commands |\n| --- | --- |"
    );
    for name in names {
        let runs: Vec<&RunResult> = rounds.iter().filter_map(|r| find(r, name)).collect();
        let mut commands: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for run in &runs {
            for (command, (calls, usec)) in &run.redis_by_command {
                let entry = commands.entry(command).or_default();
                entry.0.push(*calls);
                entry.1.push(*usec);
            }
        }
        let listed: Vec<String> = commands
            .into_iter()
            .filter_map(|(command, (mut calls, mut usec))| {
                let calls = median(&mut calls);
                (calls >= 0.005)
                    .then(|| format!("`{command}` {calls:.2} × {:.2} µs", median(&mut usec)))
            })
            .collect();
        if !listed.is_empty() {
            let _ = writeln!(md, "| {name} | {} |", listed.join(", "));
        }
    }
}

fn ceiling_section(md: &mut String, ceiling: &[Ceiling]) {
    let _ = writeln!(
        md,
        "\nRedis's own ceiling in the same run (`redis-benchmark -c 32 -n 200000`, one command at a time, on the harness's Redis):\n\n| command | requests/s | Redis µs per call |\n| --- | ---: | ---: |"
    );
    for c in ceiling {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} |",
            c.command, c.rps, c.usec_per_call
        );
    }
}

/// How the `-2x` scenarios spread their load, for the report.
const SPREAD: &str = "The `-2x` scenarios run two server processes of the stack, each with its own \
Redis connection and local copy, on two ports. wrk runs two threads, one per instance, each with \
half the connections; both threads cycle through the same seeded sessions (all seeded through \
the first instance), one per request, each at its own pace, so every session is used on both \
instances, in an order set by the two threads' speeds rather than in strict alternation. \
Server CPU per request is both processes' CPU time over all requests; peak RSS is the larger \
process's.";

/// The local copies' counters over the measured runs, summed over instances and rounds.
fn local_copy_section(md: &mut String, rounds: &[Vec<RunResult>], names: &[String]) {
    let mut rows = Vec::new();
    for name in names {
        let runs: Vec<&RunResult> = rounds.iter().filter_map(|r| find(r, name)).collect();
        let Some(copy) = runs
            .iter()
            .filter_map(|run| run.local_copy)
            .reduce(CopyCounts::add)
        else {
            continue;
        };
        let requests = runs.iter().map(|run| run.requests).sum::<u64>().max(1) as f64;
        let sent: Vec<u64> = runs.iter().fold(Vec::new(), |mut sum, run| {
            sum.resize(run.per_instance.len().max(sum.len()), 0);
            for (total, sent) in sum.iter_mut().zip(&run.per_instance) {
                *total += sent;
            }
            sum
        });
        let all_sent = sent.iter().sum::<u64>().max(1) as f64;
        let shares: Vec<String> = sent
            .iter()
            .map(|n| format!("{:.0}%", 100.0 * *n as f64 / all_sent))
            .collect();
        rows.push(format!(
            "| {name} | {} | {} | {} | {:.1}% | {:.3} | {:.3} | {} |",
            copy.hits,
            copy.misses,
            copy.invalidations,
            100.0 * copy.hit_rate(),
            copy.misses as f64 / requests,
            copy.invalidations as f64 / requests,
            shares.join(" / "),
        ));
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nThe local copy during the measured runs (`GET /copy-stats` on each instance before \
         and after; summed over instances and rounds). A hit is a read served from the copy, a \
         miss one sent to Redis, an invalidation a copy dropped because another client changed \
         its session:\n\n| scenario | hits | misses | invalidations | hit rate | misses/req | \
         invalidations/req | requests per instance |\n| --- | ---: | ---: | ---: | ---: | ---: | \
         ---: | --- |"
    );
    for row in rows {
        let _ = writeln!(md, "{row}");
    }
}

/// Horizontal bars: each scenario's requests/s as a share of plain axum's, same round.
fn svg(bars: &[(String, f64)]) -> String {
    let (label_w, bar_w, row_h, top) = (230.0, 420.0, 26.0, 40.0);
    let max = bars.iter().map(|(_, r)| *r).fold(1.0_f64, f64::max);
    let height = top + row_h * bars.len() as f64 + 30.0;
    let width = label_w + bar_w + 70.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="14">Requests/s as a share of plain axum (median of per-round ratios)</text>"#
    );
    for (i, (name, ratio)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let w = bar_w * ratio / max;
        let colour = if name.starts_with("ours") {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{name}</text><rect x="{label_w}" y="{}" width="{w:.1}" height="{}" fill="{colour}"/><text x="{:.1}" y="{}">{ratio:.2}</text>"#,
            label_w - 8.0,
            y + 15.0,
            y + 3.0,
            row_h - 8.0,
            label_w + w + 6.0,
            y + 15.0
        );
    }
    let x1 = label_w + bar_w / max;
    let _ = writeln!(
        s,
        r##"<line x1="{x1:.1}" y1="{}" x2="{x1:.1}" y2="{}" stroke="#c53030" stroke-dasharray="4 3"/>"##,
        top - 4.0,
        height - 26.0
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#555">blue: tower-turnstile; grey: peers and plain axum; dashed line: plain axum (1.0)</text>"##,
        height - 8.0
    );
    s.push_str("</svg>\n");
    s
}
