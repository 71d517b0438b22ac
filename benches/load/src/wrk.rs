//! Driving the servers with `wrk`: the Lua script, the run, and what it printed.
//!
//! wrk runs one thread per server process of the scenario, each with an equal share of the
//! connections (`-t2 -c32` on two instances: 16 each), and the script's `setup` points each
//! thread at its own instance's port. Every thread cycles through the same seeded cookies, one
//! per request, at its own pace: on two instances every session is used on both, in an order
//! set by the two threads' speeds, not in strict alternation. The script counts the requests
//! each thread sent, so the split between instances is known.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::scenario::Scenario;

/// What one wrk run printed.
pub struct Wrk {
    pub requests: u64,
    pub seconds: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Requests sent to each instance, in the order of the ports (requests still in flight
    /// at the end included).
    pub sent: Vec<u64>,
}

/// Writes the wrk script for `scenario` into `scratch`: one thread per port in `ports`,
/// cycling through `cookies`, one per request; it prints the run's figures on two lines.
pub fn script(scratch: &Path, scenario: &Scenario, ports: &[u16], cookies: &[String]) -> PathBuf {
    let (method, path) = scenario.route.method_and_path();
    let script = format!(
        r#"local cookies = {{ {cookies} }}
local ports = {{ {ports} }}
local threads = {{}}
local i = 0
sent = 0
setup = function(thread)
  thread.addr = wrk.lookup("127.0.0.1", ports[#threads + 1])[1]
  table.insert(threads, thread)
end
request = function()
  sent = sent + 1
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
  local counts = {{}}
  for _, thread in ipairs(threads) do
    table.insert(counts, tostring(thread:get("sent")))
  end
  io.write("SENT " .. table.concat(counts, " ") .. "\n")
end
"#,
        cookies = lua_strings(cookies),
        ports = lua_strings(ports.iter().map(u16::to_string)),
    );
    let path = scratch.join(format!("{}.lua", scenario.name().replace('/', "-")));
    std::fs::write(&path, script).expect("write the wrk script");
    path
}

/// The items of a Lua table of strings (Rust's quoting of these is Lua's).
fn lua_strings(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let quoted: Vec<String> = items
        .into_iter()
        .map(|item| format!("{:?}", item.as_ref()))
        .collect();
    quoted.join(", ")
}

/// Runs `script` for `duration` with `connections` in all, one thread per port in `ports`.
pub fn run(
    scenario: &Scenario,
    ports: &[u16],
    connections: usize,
    script: &Path,
    duration: Duration,
) -> Wrk {
    let output = Command::new("wrk")
        .arg(format!("-t{}", ports.len()))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("-s")
        .arg(script)
        // The script's `setup` gives each thread its address; this one only names the host.
        .arg(format!("http://127.0.0.1:{}/", ports[0]))
        .output()
        .expect("run wrk");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = |prefix: &str| -> Vec<f64> {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "wrk printed no {prefix:?} for {}:\n{stdout}",
                    scenario.name()
                )
            })
            .split_whitespace()
            .map(|f| f.parse().expect("a number from wrk"))
            .collect()
    };
    let fields = line("RESULT ");
    Wrk {
        requests: fields[0] as u64,
        seconds: fields[1] / 1e6,
        non_2xx: fields[2] as u64,
        socket_errors: fields[3] as u64,
        p50_us: fields[4],
        p99_us: fields[5],
        sent: line("SENT ").into_iter().map(|n| n as u64).collect(),
    }
}

/// Installs wrk from the distribution's packages when it is missing.
pub fn ensure_installed() {
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
