//! Running one scenario: its server processes, seeded sessions, `wrk`, and the counters read
//! before and after.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    process::{Server, check_seeded, clock_ticks, free_port, local_copy, seed, wait_for},
    scenario::Scenario,
    wrk,
};

/// What one run of one scenario measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: String,
    pub requests: u64,
    /// Requests sent to each server process (one entry per instance).
    pub per_instance: Vec<u64>,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Answers other than 2xx/3xx (`429` on the denying stacks).
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// Every server process's CPU time over every request.
    pub server_cpu_us: f64,
    pub redis_cpu_us: f64,
    pub redis_commands: f64,
    /// Per Redis command: (calls per request, Redis µs per call).
    pub redis_by_command: BTreeMap<String, (f64, f64)>,
    /// The local copy's counters over the measured run, summed over the instances (stacks
    /// with our Redis sessions only).
    pub local_copy: Option<CopyCounts>,
    /// The largest server process's.
    pub peak_rss_mib: f64,
}

/// What the local copies did during a run: reads served from a copy, reads sent to Redis,
/// copies dropped because another client changed their session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyCounts {
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
}

impl CopyCounts {
    /// The share of reads served from a copy.
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / (self.hits + self.misses).max(1) as f64
    }

    fn since(self, before: Self) -> Self {
        Self {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            invalidations: self.invalidations - before.invalidations,
        }
    }

    pub fn add(self, other: Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            invalidations: self.invalidations + other.invalidations,
        }
    }
}

impl RunResult {
    pub fn summary(&self) -> String {
        let mut summary = format!(
            "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, server {:.1} µs/req, Redis {:.1} µs/req, \
             {:.2} Redis commands/req, non-2xx {}, socket errors {}, peak RSS {:.1} MiB",
            self.rps,
            self.p50_us,
            self.p99_us,
            self.server_cpu_us,
            self.redis_cpu_us,
            self.redis_commands,
            self.non_2xx,
            self.socket_errors,
            self.peak_rss_mib
        );
        if self.per_instance.len() > 1 {
            summary += &format!(", sent per instance {:?}", self.per_instance);
        }
        if let Some(copy) = self.local_copy {
            summary += &format!(
                ", local copy: {} hits, {} misses ({:.1}% hits), {} invalidations",
                copy.hits,
                copy.misses,
                copy.hit_rate() * 100.0,
                copy.invalidations
            );
        }
        summary
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "requests": self.requests,
            "requests_per_instance": self.per_instance,
            "seconds": self.seconds,
            "rps": self.rps,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "server_cpu_us_per_request": self.server_cpu_us,
            "redis_cpu_us_per_request": self.redis_cpu_us,
            "redis_commands_per_request": self.redis_commands,
            "redis_by_command": self.redis_by_command.iter().map(|(name, (calls, usec))| {
                (name.clone(), json!({"calls_per_request": calls, "usec_per_call": usec}))
            }).collect::<serde_json::Map<_, _>>(),
            "local_copy": self.local_copy.map(|copy| json!({
                "hits": copy.hits,
                "misses": copy.misses,
                "invalidations": copy.invalidations,
            })),
            "peak_rss_mib": self.peak_rss_mib,
        })
    }
}

/// One line of Redis's ceiling: a command alone, as fast as `redis-benchmark` sends it.
#[derive(Debug, Clone)]
pub struct Ceiling {
    pub command: String,
    pub rps: f64,
    pub usec_per_call: f64,
}

/// The harness's own Redis, and how it runs scenarios against it.
pub struct Harness {
    redis: Child,
    redis_port: u16,
    duration: Duration,
    connections: usize,
    scratch: PathBuf,
    clock_ticks: f64,
}

impl Harness {
    /// Starts a `redis-server` on a free loopback port, keeping nothing on disk.
    pub fn start(duration: Duration, connections: usize) -> Self {
        let port = free_port();
        let scratch = std::env::temp_dir().join(format!("turnstile-load-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("create a scratch directory");
        let redis = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&scratch)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("redis-server could not start: {error}"));
        let harness = Self {
            redis,
            redis_port: port,
            duration,
            connections,
            scratch,
            clock_ticks: clock_ticks(),
        };
        wait_for(port, "redis-server");
        harness
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn redis_cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Redis's CPU time so far, in seconds (user + system).
    fn redis_cpu(&self) -> f64 {
        let info = self.redis_cli(&["INFO", "cpu"]);
        ["used_cpu_user:", "used_cpu_sys:"]
            .iter()
            .filter_map(|field| {
                info.lines()
                    .find_map(|line| line.strip_prefix(field))
                    .and_then(|value| value.trim().parse::<f64>().ok())
            })
            .sum()
    }

    /// Commands run since the last `CONFIG RESETSTAT`: name → (calls, µs), without the
    /// harness's own `INFO` and `CONFIG`.
    fn redis_commands(&self) -> BTreeMap<String, (u64, u64)> {
        let info = self.redis_cli(&["INFO", "commandstats"]);
        let mut commands = BTreeMap::new();
        for line in info.lines() {
            let Some((name, stats)) = line
                .trim()
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if matches!(name, "info" | "config" | "flushall" | "ping") {
                continue;
            }
            let field = |key: &str| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            commands.insert(name.to_owned(), (field("calls="), field("usec=")));
        }
        commands
    }

    /// Runs `scenario` once, in fresh server processes.
    pub fn run(&self, scenario: Scenario) -> RunResult {
        self.redis_cli(&["FLUSHALL"]);
        let servers: Vec<Server> = (0..scenario.instances)
            .map(|_| Server::start(scenario.stack, &self.redis_url()))
            .collect();
        let ports: Vec<u16> = servers.iter().map(|server| server.port).collect();
        // Seeded through the first instance: the others learn each session on its first read.
        let cookies: Vec<String> = if scenario.has_sessions() {
            (0..self.connections).map(|_| seed(ports[0])).collect()
        } else {
            Vec::new()
        };
        if let Some(cookie) = cookies.first() {
            ports.iter().for_each(|&port| check_seeded(port, cookie));
        }
        let script = wrk::script(&self.scratch, &scenario, &ports, &cookies);
        // Warm-up: connections, caches, scripts loaded, the allocator at its working size.
        wrk::run(
            &scenario,
            &ports,
            self.connections,
            &script,
            Duration::from_secs(2),
        );

        let copy_before = scenario.has_local_copy().then(|| local_copy(&ports));
        let cpu = || -> f64 {
            let ticks = self.clock_ticks;
            servers.iter().map(|server| server.cpu_seconds(ticks)).sum()
        };
        let cpu_before = cpu();
        let redis_before = self.redis_cpu();
        self.redis_cli(&["CONFIG", "RESETSTAT"]);
        let wrk = wrk::run(&scenario, &ports, self.connections, &script, self.duration);
        let cpu_after = cpu();
        let redis_after = self.redis_cpu();
        let commands = self.redis_commands();
        let local_copy = copy_before.map(|before| local_copy(&ports).since(before));
        let peak_rss_mib = servers.iter().map(Server::peak_rss_mib).fold(0.0, f64::max);
        drop(servers);

        let requests = wrk.requests.max(1) as f64;
        RunResult {
            scenario: scenario.name(),
            requests: wrk.requests,
            per_instance: wrk.sent,
            seconds: wrk.seconds,
            rps: wrk.requests as f64 / wrk.seconds,
            p50_us: wrk.p50_us,
            p99_us: wrk.p99_us,
            non_2xx: wrk.non_2xx,
            socket_errors: wrk.socket_errors,
            server_cpu_us: (cpu_after - cpu_before) * 1e6 / requests,
            redis_cpu_us: (redis_after - redis_before) * 1e6 / requests,
            redis_commands: commands.values().map(|&(calls, _)| calls).sum::<u64>() as f64
                / requests,
            redis_by_command: per_request(&commands, requests),
            local_copy,
            peak_rss_mib,
        }
    }

    /// Redis's own ceiling on this machine, in the same run: `redis-benchmark -c <connections>`
    /// for each command our stacks and the peers' send, with Redis µs per call from
    /// `INFO commandstats`.
    pub fn ceiling(&self) -> Vec<Ceiling> {
        self.redis_cli(&["FLUSHALL"]);
        // A tower-sessions record (a JSON string) and a session hash like ours.
        self.redis_cli(&["SET", "ts:record", &format!("{{\"id\":\"{}\",\"data\":{{\"n\":\"7\"}},\"expiry_date\":[2026,335,0,0,0,0,0,0,0]}}", "x".repeat(22))]);
        self.redis_cli(&[
            "HSET",
            "ours:session",
            "m:tenant",
            "default",
            "m:created",
            "1764547200000",
            "m:abs",
            "0",
            "m:idle",
            "86400000",
            "n",
            "7",
        ]);
        self.redis_cli(&["PEXPIRE", "ours:session", "86400000"]);
        let sliding_window = concat!(
            include_str!("../../../src/ratelimit/store/lua/prelude.lua"),
            include_str!("../../../src/ratelimit/store/lua/answer.lua"),
            include_str!("../../../src/ratelimit/store/lua/sliding_window.lua")
        );
        let sha = self.redis_cli(&["SCRIPT", "LOAD", sliding_window]);
        let sha = sha.trim();
        let commands: Vec<(&str, Vec<&str>)> = vec![
            ("GET (tower-sessions' read)", vec!["GET", "ts:record"]),
            (
                "SET .. EX (tower-sessions' save)",
                vec!["SET", "ts:saved", "x", "EX", "86400"],
            ),
            ("HGETALL (our read)", vec!["HGETALL", "ours:session"]),
            (
                "PEXPIRE (our slide)",
                vec!["PEXPIRE", "ours:session", "86400000"],
            ),
            ("TIME", vec!["TIME"]),
            (
                "EVALSHA sliding window (our rate-limit decision)",
                vec![
                    "EVALSHA",
                    sha,
                    "1",
                    "rl:key",
                    "",
                    "1000000000000",
                    "1000000000",
                    "1",
                ],
            ),
        ];
        let mut ceiling = Vec::new();
        for (label, command) in commands {
            self.redis_cli(&["CONFIG", "RESETSTAT"]);
            let output = Command::new("redis-benchmark")
                .args(["-p", &self.redis_port.to_string()])
                .args(["-c", &self.connections.to_string(), "-n", "200000", "--csv"])
                .args(&command)
                .output()
                .expect("run redis-benchmark");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let rps = stdout
                .lines()
                .filter_map(|line| line.split("\",\"").nth(1))
                .find_map(|value| value.trim_matches('"').parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            let name = command[0].to_ascii_lowercase();
            let usec_per_call = self
                .redis_commands()
                .get(&name)
                .map_or(f64::NAN, |&(calls, usec)| usec as f64 / calls.max(1) as f64);
            eprintln!("ceiling: {label}: {rps:.0} requests/s, {usec_per_call:.2} µs per call");
            ceiling.push(Ceiling {
                command: label.to_owned(),
                rps,
                usec_per_call,
            });
        }
        ceiling
    }

    /// Versions of what the run used, for the report.
    pub fn versions(&self) -> BTreeMap<String, String> {
        let mut versions = BTreeMap::new();
        let info = self.redis_cli(&["INFO", "server"]);
        if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
            versions.insert("redis".into(), v.trim().into());
        }
        for (name, command) in [("wrk", vec!["wrk", "-v"]), ("rustc", vec!["rustc", "-V"])] {
            if let Ok(output) = Command::new(command[0]).args(&command[1..]).output() {
                let text = String::from_utf8_lossy(&output.stdout).into_owned()
                    + &String::from_utf8_lossy(&output.stderr);
                if let Some(first) = text.lines().next() {
                    versions.insert(name.into(), first.trim().into());
                }
            }
        }
        if let Ok(cpu) = std::fs::read_to_string("/proc/cpuinfo") {
            if let Some(model) = cpu.lines().find_map(|l| l.strip_prefix("model name")) {
                versions.insert(
                    "cpu".into(),
                    model.trim_start_matches([' ', '\t', ':']).into(),
                );
            }
            let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
            versions.insert("cores".into(), cores.to_string());
        }
        versions
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.redis.kill();
        let _ = self.redis.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Per Redis command: (calls per request, Redis µs per call), from (calls, µs) over `requests`.
fn per_request(
    commands: &BTreeMap<String, (u64, u64)>,
    requests: f64,
) -> BTreeMap<String, (f64, f64)> {
    commands
        .iter()
        .map(|(name, &(calls, usec))| {
            let per_call = if calls == 0 {
                0.0
            } else {
                usec as f64 / calls as f64
            };
            (name.clone(), (calls as f64 / requests, per_call))
        })
        .collect()
}
