//! The load harness: tower-turnstile and its peers as axum servers over real TCP, on a Redis of
//! the harness's own, driven by `wrk` in interleaved rounds.
//!
//! ```text
//! cargo run --release --manifest-path benches/load/Cargo.toml -- [--rounds 3] [--duration 10]
//!     [--connections 32] [--only plain/read,ours-session/read] [--samples 2000] [--out DIR]
//! cargo run --release --manifest-path benches/load/Cargo.toml -- delay [--samples 2000]
//! ```
//!
//! Each scenario (a stack and a route) runs in fresh server processes: one, or two for the
//! `-2x` scenarios (`ours-session-copy-2x/read`, `/write`), which share one load (see `wrk`).
//! Per scenario and round the harness records requests/s, p50/p99 latency, the servers' and
//! Redis's CPU per request (`/proc/<pid>/stat` summed over the servers, `INFO cpu`), Redis
//! commands per request (`INFO commandstats` after `CONFIG RESETSTAT`), the local copy's hits,
//! misses and invalidations (the `ours-session-copy` stacks) and the largest server's peak RSS. Ratios are taken
//! within a round, then the median over rounds is reported (`report.md`, `results.json`,
//! `ratios.svg` in the output directory). After the rounds, the invalidation delay between two
//! instances is measured (`delay`; `--samples 0` skips it); `delay` alone measures only that,
//! on a Redis of its own, and prints it.

mod comparisons;
mod delay;
mod measure;
mod process;
mod report;
mod scenario;
mod servers;
mod wrk;

use std::{path::PathBuf, time::Duration};

use measure::{Harness, RunResult};
use scenario::Scenario;

struct Options {
    rounds: usize,
    duration: Duration,
    connections: usize,
    only: Option<Vec<String>>,
    /// Samples of the invalidation delay (and as many stale-read checks); 0 for none.
    samples: usize,
    out: PathBuf,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("delay") => delay_only(&parse(&args[1..])),
        _ => measure_all(&args),
    }
}

/// `turnstile-load serve STACK PORT REDIS_URL`: one server process of a scenario.
fn serve(args: &[String]) {
    let [_, stack, port, redis] = args else {
        exit("usage: turnstile-load serve STACK PORT REDIS_URL");
    };
    let port = port
        .parse()
        .unwrap_or_else(|_| exit("PORT must be a number"));
    tokio::runtime::Runtime::new()
        .expect("a Tokio runtime")
        .block_on(servers::serve(stack, port, redis));
}

/// `turnstile-load delay`: the invalidation delay alone, on a Redis of its own, printed.
fn delay_only(options: &Options) {
    if options.samples == 0 {
        exit("delay needs --samples of at least 1");
    }
    let harness = Harness::start(options.duration, options.connections);
    let delay = delay::measure(&harness.redis_url(), options.samples);
    println!("{}", delay.summary());
}

/// The rounds, Redis's ceiling and the invalidation delay, written into the report.
fn measure_all(args: &[String]) {
    let options = parse(args);
    let scenarios: Vec<Scenario> = scenario::SCENARIOS
        .iter()
        .copied()
        .filter(|s| {
            options
                .only
                .as_ref()
                .is_none_or(|only| only.iter().any(|o| *o == s.name()))
        })
        .collect();
    if scenarios.is_empty() {
        exit("--only matched no scenario");
    }
    wrk::ensure_installed();
    let harness = Harness::start(options.duration, options.connections);
    let rounds: Vec<Vec<RunResult>> = (0..options.rounds)
        .map(|round| run_round(&harness, &scenarios, round, options.rounds))
        .collect();
    let ceiling = harness.ceiling();
    let delay = (options.samples > 0).then(|| {
        let delay = delay::measure(&harness.redis_url(), options.samples);
        eprintln!("{}", delay.summary());
        delay
    });
    let versions = harness.versions();
    drop(harness);
    std::fs::create_dir_all(&options.out).expect("create the output directory");
    report::write(
        &options.out,
        &rounds,
        &ceiling,
        delay.as_ref(),
        &versions,
        &command_line(args),
    );
    eprintln!("written to {}", options.out.display());
}

/// Every scenario once. Interleaved: the order rotated by `round`, so that none always runs
/// first (or right after the same neighbour).
fn run_round(harness: &Harness, scenarios: &[Scenario], round: usize, of: usize) -> Vec<RunResult> {
    let mut order = scenarios.to_vec();
    let shift = round % order.len();
    order.rotate_left(shift);
    order
        .into_iter()
        .map(|scenario| {
            eprintln!("round {}/{of}: {}", round + 1, scenario.name());
            let result = harness.run(scenario);
            eprintln!("  {}", result.summary());
            let refused = result.non_2xx as f64 / result.requests.max(1) as f64;
            if (scenario.denies() && refused < 0.99) || (!scenario.denies() && refused > 0.0) {
                eprintln!(
                    "  WARNING: {:.2}% of the answers were not 2xx",
                    refused * 100.0
                );
            }
            result
        })
        .collect()
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 3,
        duration: Duration::from_secs(10),
        connections: 32,
        only: None,
        samples: 2000,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"),
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| exit(&format!("{flag} needs a value")))
                .clone()
        };
        match flag.as_str() {
            "--rounds" => options.rounds = number(&value(), flag),
            "--duration" => options.duration = Duration::from_secs(number(&value(), flag) as u64),
            "--connections" => options.connections = number(&value(), flag),
            "--only" => options.only = Some(value().split(',').map(str::to_owned).collect()),
            "--samples" => options.samples = number(&value(), flag),
            "--out" => options.out = PathBuf::from(value()),
            "--help" | "-h" => exit(
                "turnstile-load [--rounds N] [--duration SECONDS] [--connections N] \
                 [--only SCENARIO,..] [--samples N] [--out DIR]\n\
                 turnstile-load delay [--samples N]",
            ),
            other => exit(&format!("unknown argument {other:?} (try --help)")),
        }
    }
    if options.rounds == 0 {
        exit("--rounds must be at least 1");
    }
    options
}

fn number(text: &str, flag: &str) -> usize {
    text.parse()
        .unwrap_or_else(|_| exit(&format!("{flag} takes a number, not {text:?}")))
}

fn command_line(args: &[String]) -> String {
    let mut line = String::from("cargo run --release --manifest-path benches/load/Cargo.toml --");
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

fn exit(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2)
}
