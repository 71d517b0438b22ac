//! The ratios the report names (ours over an anchor, taken within each round), and their
//! table.

use std::fmt::Write as _;

use crate::{
    measure::RunResult,
    report::{find, median},
};

/// A ratio the issue names: `ours` over `anchor`, on requests/s unless `on` says otherwise.
struct Comparison {
    label: &'static str,
    ours: &'static str,
    anchor: &'static str,
    on: Metric,
    /// The target, and whether a higher ratio is better.
    target: Option<(f64, bool)>,
}

#[derive(Clone, Copy)]
enum Metric {
    Throughput,
    ServerCpu,
    RedisCpu,
}

impl Metric {
    fn of(self, run: &RunResult) -> f64 {
        match self {
            Self::Throughput => run.rps,
            Self::ServerCpu => run.server_cpu_us,
            Self::RedisCpu => run.redis_cpu_us,
        }
    }
}

const COMPARISONS: &[Comparison] = &[
    Comparison {
        label: "session read with the local copy / tower-sessions read",
        ours: "ours-session-copy/read",
        anchor: "ts-session/read",
        on: Metric::Throughput,
        target: Some((1.5, true)),
    },
    Comparison {
        label: "session read with the local copy / plain axum",
        ours: "ours-session-copy/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: Some((0.6, true)),
    },
    Comparison {
        label: "server CPU per session read with the local copy / tower-sessions in memory",
        ours: "ours-session-copy/read",
        anchor: "ts-session-memory/read",
        on: Metric::ServerCpu,
        target: Some((1.0, false)),
    },
    Comparison {
        label: "session write with the local copy / tower-sessions write",
        ours: "ours-session-copy/write",
        anchor: "ts-session/write",
        on: Metric::Throughput,
        target: Some((1.5, true)),
    },
    Comparison {
        label: "session read without the copy (the default) / tower-sessions read",
        ours: "ours-session/read",
        anchor: "ts-session/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "session write without the copy (the default) / tower-sessions write",
        ours: "ours-session/write",
        anchor: "ts-session/write",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "session read / tower-sessions `always_save` read",
        ours: "ours-session/read",
        anchor: "ts-session-always-save/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "Redis CPU per session read / tower-sessions'",
        ours: "ours-session/read",
        anchor: "ts-session/read",
        on: Metric::RedisCpu,
        target: Some((1.0, false)),
    },
    Comparison {
        label: "Redis CPU per session write / tower-sessions'",
        ours: "ours-session/write",
        anchor: "ts-session/write",
        on: Metric::RedisCpu,
        target: Some((1.0, false)),
    },
    Comparison {
        label: "server CPU per session read without the copy / tower-sessions in memory",
        ours: "ours-session/read",
        anchor: "ts-session-memory/read",
        on: Metric::ServerCpu,
        target: None,
    },
    Comparison {
        label: "session read with the local copy / without",
        ours: "ours-session-copy/read",
        anchor: "ours-session/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "session write with the local copy / without",
        ours: "ours-session-copy/write",
        anchor: "ours-session/write",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "server CPU per session read with the copy, two instances / one",
        ours: "ours-session-copy-2x/read",
        anchor: "ours-session-copy/read",
        on: Metric::ServerCpu,
        target: None,
    },
    Comparison {
        label: "server CPU per session write with the copy, two instances / one",
        ours: "ours-session-copy-2x/write",
        anchor: "ours-session-copy/write",
        on: Metric::ServerCpu,
        target: None,
    },
    Comparison {
        label: "Redis CPU per session write with the copy, two instances / one",
        ours: "ours-session-copy-2x/write",
        anchor: "ours-session-copy/write",
        on: Metric::RedisCpu,
        target: None,
    },
    Comparison {
        label: "rate limit on Redis, allowed / plain axum",
        ours: "ours-ratelimit/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "tower_governor allowed / plain axum",
        ours: "governor-allow/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "rate limit on Redis with a lease of 100, allowed / plain axum",
        ours: "ours-ratelimit-lease/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "whole stack with the local copy (Redis rate limit + tenant + session) / plain axum",
        ours: "ours-stack-copy/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: Some((0.4, true)),
    },
    Comparison {
        label: "whole stack with the copy and the lease / plain axum",
        ours: "ours-stack-lease-copy/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: Some((0.6, true)),
    },
    Comparison {
        label: "whole stack without the copy / plain axum",
        ours: "ours-stack/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "whole stack with the lease, without the copy / plain axum",
        ours: "ours-stack-lease/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "tower-sessions + tower_governor / plain axum",
        ours: "ts-stack/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "whole stack with the copy / tower-sessions + tower_governor",
        ours: "ours-stack-copy/read",
        anchor: "ts-stack/read",
        on: Metric::Throughput,
        target: None,
    },
    Comparison {
        label: "denied flood / plain axum",
        ours: "ours-deny/read",
        anchor: "plain/read",
        on: Metric::Throughput,
        target: Some((0.9, true)),
    },
    Comparison {
        label: "denied flood / tower_governor deny",
        ours: "ours-deny/read",
        anchor: "governor-deny/read",
        on: Metric::Throughput,
        target: None,
    },
];

/// The ratios' table: per round, the median, and the target when there is one.
pub fn table(md: &mut String, rounds: &[Vec<RunResult>]) {
    let _ = writeln!(
        md,
        "\nRatios taken within each round (ours / anchor), then the median:\n\n| comparison | per round | median | target | met |\n| --- | --- | ---: | ---: | --- |"
    );
    for c in COMPARISONS {
        let mut per_round: Vec<f64> = rounds
            .iter()
            .filter_map(|round| {
                Some(c.on.of(find(round, c.ours)?) / c.on.of(find(round, c.anchor)?))
            })
            .collect();
        if per_round.is_empty() {
            continue;
        }
        let listed: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
        let med = median(&mut per_round);
        let (target, met) = match c.target {
            Some((t, higher)) => (
                format!("{} {t}", if higher { "≥" } else { "≤" }),
                if (higher && med >= t) || (!higher && med <= t) {
                    "yes"
                } else {
                    "**no**"
                },
            ),
            None => ("—".into(), ""),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {med:.2} | {target} | {met} |",
            c.label,
            listed.join(", ")
        );
    }
}
