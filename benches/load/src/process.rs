//! The server processes under load, seen from the harness: starting one, asking it over a
//! connection of its own, and reading its CPU time and memory from `/proc`.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::measure::CopyCounts;

/// One server process of a stack, killed when dropped.
pub struct Server {
    process: Child,
    pub port: u16,
}

impl Server {
    /// Starts `turnstile-load serve STACK PORT REDIS_URL` on a free port and waits until it
    /// listens.
    pub fn start(stack: &str, redis_url: &str) -> Self {
        let port = free_port();
        let process = Command::new(std::env::current_exe().expect("the harness's own path"))
            .args(["serve", stack, &port.to_string(), redis_url])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server");
        let server = Self { process, port };
        wait_for(port, stack);
        server
    }

    /// CPU time so far (user + system), in seconds; `ticks` is the clock's ticks per second.
    pub fn cpu_seconds(&self, ticks: f64) -> f64 {
        process_cpu(self.process.id(), ticks)
    }

    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_kib(self.process.id()) / 1024.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Sends one request on a connection of its own, with `cookie` (`name=value`) if given, and
/// returns the response.
fn request(port: u16, method: &str, path: &str, cookie: Option<&str>) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    let cookie = cookie.map_or(String::new(), |cookie| format!("Cookie: {cookie}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    response
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Starts a session with one `POST /write` and returns its cookie (`name=value`).
pub fn seed(port: u16) -> String {
    let response = request(port, "POST", "/write", None);
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

/// Checks that the server on `port` knows the session a `seed` started: its `GET /read`
/// answers the seeded counter, 1. A stack that did not would start a session per request.
pub fn check_seeded(port: u16, cookie: &str) {
    let response = request(port, "GET", "/read", Some(cookie));
    assert_eq!(
        body(&response),
        "1",
        "the server on port {port} did not read the seeded session:\n{response}"
    );
}

/// The local copies' counters so far, summed over the servers on `ports` (`GET /copy-stats`
/// answers `hits misses invalidations`).
pub fn local_copy(ports: &[u16]) -> CopyCounts {
    ports
        .iter()
        .map(|&port| {
            let response = request(port, "GET", "/copy-stats", None);
            let counts: Vec<u64> = body(&response)
                .split_whitespace()
                .map(|n| n.parse().expect("a count from /copy-stats"))
                .collect();
            let [hits, misses, invalidations] = counts[..] else {
                panic!("/copy-stats answered {response:?}");
            };
            CopyCounts {
                hits,
                misses,
                invalidations,
            }
        })
        .fold(CopyCounts::default(), CopyCounts::add)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

pub fn wait_for(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            panic!("{what} did not listen on port {port} within 30 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn clock_ticks() -> f64 {
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
