//! Running one scenario: a server process, seeded sessions, `wrk`, and the counters read
//! before and after.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// One stack under one route.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub stack: &'static str,
    pub route: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /read` with a session cookie (when the stack has sessions).
    Read,
    /// `POST /write` with a session cookie.
    Write,
}

impl Scenario {
    const fn new(stack: &'static str, route: Route) -> Self {
        Self { stack, route }
    }

    pub fn name(&self) -> String {
        let route = match self.route {
            Route::Read => "read",
            Route::Write => "write",
        };
        format!("{}/{route}", self.stack)
    }

    fn has_sessions(&self) -> bool {
        self.stack.contains("session") || self.stack.contains("-stack")
    }

    /// Whether the stack answers `429` to (nearly) every request of the run.
    pub fn denies(&self) -> bool {
        self.stack.ends_with("-deny")
    }
}

/// Every scenario, in the order of the reports.
pub const SCENARIOS: &[Scenario] = &[
    Scenario::new("plain", Route::Read),
    Scenario::new("ours-session", Route::Read),
    Scenario::new("ts-session", Route::Read),
    Scenario::new("ts-session-always-save", Route::Read),
    Scenario::new("ours-session", Route::Write),
    Scenario::new("ts-session", Route::Write),
    Scenario::new("ours-ratelimit", Route::Read),
    Scenario::new("governor-allow", Route::Read),
    Scenario::new("ours-deny", Route::Read),
    Scenario::new("governor-deny", Route::Read),
    Scenario::new("ours-stack", Route::Read),
    Scenario::new("ours-ratelimit-lease", Route::Read),
    Scenario::new("ours-stack-lease", Route::Read),
    Scenario::new("ts-stack", Route::Read),
];

/// What one run of one scenario measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: String,
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Answers other than 2xx/3xx (`429` on the denying stacks).
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub server_cpu_us: f64,
    pub redis_cpu_us: f64,
    pub redis_commands: f64,
    /// Per Redis command: (calls per request, Redis µs per call).
    pub redis_by_command: BTreeMap<String, (f64, f64)>,
    pub peak_rss_mib: f64,
}

impl RunResult {
    pub fn summary(&self) -> String {
        format!(
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
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "requests": self.requests,
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

    fn redis_url(&self) -> String {
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

    /// Runs `scenario` once in a fresh server process.
    pub fn run(&self, scenario: Scenario) -> RunResult {
        self.redis_cli(&["FLUSHALL"]);
        let port = free_port();
        let mut server = Command::new(std::env::current_exe().expect("the harness's own path"))
            .args([
                "serve",
                scenario.stack,
                &port.to_string(),
                &self.redis_url(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server");
        wait_for(port, scenario.stack);
        let cookies = if scenario.has_sessions() {
            (0..self.connections).map(|_| seed(port)).collect()
        } else {
            Vec::new()
        };
        let script = self.script(&scenario, &cookies);
        // Warm-up: connections, caches, scripts loaded, the allocator at its working size.
        self.wrk(port, &scenario, &script, Duration::from_secs(2));

        let cpu_before = process_cpu(server.id(), self.clock_ticks);
        let redis_before = self.redis_cpu();
        self.redis_cli(&["CONFIG", "RESETSTAT"]);
        let wrk = self.wrk(port, &scenario, &script, self.duration);
        let cpu_after = process_cpu(server.id(), self.clock_ticks);
        let redis_after = self.redis_cpu();
        let commands = self.redis_commands();
        let peak_rss_mib = peak_rss_kib(server.id()) / 1024.0;
        let _ = server.kill();
        let _ = server.wait();

        let requests = wrk.requests.max(1) as f64;
        let redis_by_command = commands
            .iter()
            .map(|(name, &(calls, usec))| {
                let per_call = if calls == 0 {
                    0.0
                } else {
                    usec as f64 / calls as f64
                };
                (name.clone(), (calls as f64 / requests, per_call))
            })
            .collect();
        RunResult {
            scenario: scenario.name(),
            requests: wrk.requests,
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
            redis_by_command,
            peak_rss_mib,
        }
    }

    /// The wrk script: cycles through the seeded cookies, one per request, and prints the
    /// run's figures on one line.
    fn script(&self, scenario: &Scenario, cookies: &[String]) -> PathBuf {
        let (method, path) = match scenario.route {
            Route::Read => ("GET", "/read"),
            Route::Write => ("POST", "/write"),
        };
        let list: Vec<String> = cookies.iter().map(|c| format!("{c:?}")).collect();
        let script = format!(
            r#"local cookies = {{ {list} }}
local i = 0
request = function()
  local headers = {{}}
  if #cookies > 0 then
    i = i % #cookies + 1
    headers["Cookie"] = cookies[i]
  end
  return wrk.format("{method}", "{path}", headers)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %f %f\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#,
            list = list.join(", ")
        );
        let path = self
            .scratch
            .join(format!("{}.lua", scenario.name().replace('/', "-")));
        std::fs::write(&path, script).expect("write the wrk script");
        path
    }

    fn wrk(&self, port: u16, scenario: &Scenario, script: &PathBuf, duration: Duration) -> Wrk {
        let output = Command::new("wrk")
            .args(["-t1", &format!("-c{}", self.connections)])
            .arg(format!("-d{}s", duration.as_secs().max(1)))
            .arg("-s")
            .arg(script)
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .expect("run wrk");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|line| line.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("wrk printed no result for {}:\n{stdout}", scenario.name()));
        let fields: Vec<f64> = line
            .split_whitespace()
            .map(|f| f.parse().expect("a number from wrk"))
            .collect();
        Wrk {
            requests: fields[0] as u64,
            seconds: fields[1] / 1e6,
            non_2xx: fields[2] as u64,
            socket_errors: fields[3] as u64,
            p50_us: fields[4],
            p99_us: fields[5],
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

struct Wrk {
    requests: u64,
    seconds: f64,
    non_2xx: u64,
    socket_errors: u64,
    p50_us: f64,
    p99_us: f64,
}

/// Installs wrk from the distribution's packages when it is missing.
pub fn ensure_wrk() {
    if Command::new("wrk").arg("-v").output().is_ok() {
        return;
    }
    eprintln!("wrk is missing: installing it with apt-get");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            Command::new("sudo")
        };
        if !root {
            command.arg("apt-get");
        }
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let installed = apt(&["update", "-q"]).is_ok_and(|s| s.success())
        && apt(&["install", "-y", "-q", "wrk"]).is_ok_and(|s| s.success());
    if !installed {
        eprintln!("could not install wrk; install it (e.g. `apt-get install wrk`) and run again");
        std::process::exit(1);
    }
}

/// Starts a session with one `POST /write` and returns its cookie (`name=value`).
fn seed(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    stream
        .write_all(
            b"POST /write HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .expect("send the seeding request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the seeding response");
    response
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie").then(|| {
                value
                    .trim()
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .unwrap_or_else(|| panic!("the seeding request set no cookie:\n{response}"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn wait_for(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            panic!("{what} did not listen on port {port} within 30 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A process's CPU time so far (user + system), in seconds, from `/proc/<pid>/stat`.
fn process_cpu(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: count fields after its closing parenthesis.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (field(11) + field(12)) / ticks
}

fn peak_rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}
