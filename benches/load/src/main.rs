//! The load harness: tower-turnstile and its peers as axum servers over real TCP, on a Redis of
//! the harness's own, driven by `wrk` in interleaved rounds.
//!
//! ```text
//! cargo run --release --manifest-path benches/load/Cargo.toml -- [--rounds 3] [--duration 10]
//!     [--connections 32] [--only plain/read,ours-session/read] [--out DIR]
//! ```
//!
//! Each scenario (a stack and a route) runs in a fresh server process; per scenario and round
//! the harness records requests/s, p50/p99 latency, the server's and Redis's CPU per request
//! (`/proc/<pid>/stat`, `INFO cpu`), Redis commands per request (`INFO commandstats` after
//! `CONFIG RESETSTAT`) and the server's peak RSS. Ratios are taken within a round, then the
//! median over rounds is reported (`report.md`, `results.json`, `ratios.svg` in the output
//! directory).

mod measure;
mod report;
mod servers;

use std::{path::PathBuf, time::Duration};

use measure::{Harness, Scenario};

struct Options {
    rounds: usize,
    duration: Duration,
    connections: usize,
    only: Option<Vec<String>>,
    out: PathBuf,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        let [_, stack, port, redis] = args.as_slice() else {
            exit("usage: turnstile-load serve STACK PORT REDIS_URL");
        };
        let port = port
            .parse()
            .unwrap_or_else(|_| exit("PORT must be a number"));
        tokio::runtime::Runtime::new()
            .expect("a Tokio runtime")
            .block_on(servers::serve(stack, port, redis));
        return;
    }
    let options = parse(&args);
    let scenarios: Vec<Scenario> = measure::SCENARIOS
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
    measure::ensure_wrk();
    let harness = Harness::start(options.duration, options.connections);
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        // Interleaved: every scenario once per round, the order rotated so that none always
        // runs first (or right after the same neighbour).
        let mut order = scenarios.clone();
        let shift = round % order.len();
        order.rotate_left(shift);
        let mut results = Vec::new();
        for scenario in order {
            eprintln!(
                "round {}/{}: {}",
                round + 1,
                options.rounds,
                scenario.name()
            );
            let result = harness.run(scenario);
            eprintln!("  {}", result.summary());
            let refused = result.non_2xx as f64 / result.requests.max(1) as f64;
            if (scenario.denies() && refused < 0.99) || (!scenario.denies() && refused > 0.0) {
                eprintln!(
                    "  WARNING: {:.2}% of the answers were not 2xx",
                    refused * 100.0
                );
            }
            results.push(result);
        }
        rounds.push(results);
    }
    let ceiling = harness.ceiling();
    let versions = harness.versions();
    drop(harness);
    std::fs::create_dir_all(&options.out).expect("create the output directory");
    report::write(
        &options.out,
        &rounds,
        &ceiling,
        &versions,
        &command_line(&args),
    );
    eprintln!("written to {}", options.out.display());
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 3,
        duration: Duration::from_secs(10),
        connections: 32,
        only: None,
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
            "--out" => options.out = PathBuf::from(value()),
            "--help" | "-h" => exit(
                "turnstile-load [--rounds N] [--duration SECONDS] [--connections N] \
                 [--only SCENARIO,..] [--out DIR]",
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
