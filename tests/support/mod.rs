//! The real-Redis harness shared by the integration tests.
//!
//! Each test that needs Redis spawns its own `redis-server` on an ephemeral loopback port
//! (it starts in milliseconds) and the server dies with the [`RedisServer`] value, so tests can
//! kill, stall and restart their server without disturbing each other. Without `redis-server`
//! on the machine the Redis tests print a loud SKIPPED line, unless `REQUIRE_REDIS=1`, which
//! makes a missing server a failure (CI sets it).
#![allow(dead_code, unreachable_pub)]

pub mod drill;
pub mod http;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod proxy;
pub mod session_app;

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// A `redis-server` process owned by one test.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Where a persistent server keeps its append-only file.
    dir: Option<std::path::PathBuf>,
    /// Further `redis-server` arguments (a replica's `--replicaof`), kept for restarts.
    extra: Vec<String>,
    /// The default user's password, when the server requires one (`redis-cli` sends it).
    password: Option<String>,
}

/// Whether Redis tests must run (CI) rather than skip.
fn required() -> bool {
    std::env::var("REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl RedisServer {
    /// Starts a server, or returns `None` (after saying so loudly) when `redis-server` is not
    /// installed and `REQUIRE_REDIS` is not `1`.
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// Starts a server that keeps every write on disk (append-only file, synced on each write),
    /// so that [`RedisServer::restart`] after [`RedisServer::stop`] brings its data back.
    pub fn start_persistent() -> Option<Self> {
        Self::start_with(true)
    }

    /// Starts a server that replicates `master`.
    pub fn start_replica_of(master: &RedisServer) -> Option<Self> {
        let extra = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port.to_string(),
        ];
        Self::start_with_args(false, extra)
    }

    /// Starts a server with `extra` arguments.
    pub fn start_configured(extra: &[&str]) -> Option<Self> {
        Self::start_with_args(false, extra.iter().map(|arg| (*arg).to_owned()).collect())
    }

    fn start_with(persistent: bool) -> Option<Self> {
        Self::start_with_args(persistent, Vec::new())
    }

    /// Starts a server whose default user needs `password`, with `extra` arguments (more ACL
    /// users, say).
    pub fn start_with_password(password: &str, extra: &[&str]) -> Option<Self> {
        let mut args = vec!["--requirepass".to_owned(), password.to_owned()];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let mut server = Self::start_with_args(false, args)?;
        server.password = Some(password.to_owned());
        Some(server)
    }

    pub(crate) fn start_with_args(persistent: bool, extra: Vec<String>) -> Option<Self> {
        for _ in 0..5 {
            let port = free_port();
            let dir = persistent.then(|| {
                let dir = std::env::temp_dir()
                    .join(format!("turnstile-redis-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("temporary directory");
                dir
            });
            let mut server = Self {
                port,
                child: None,
                dir,
                extra: extra.clone(),
                password: None,
            };
            match server.launch() {
                Ok(()) => return Some(server),
                Err(LaunchError::Missing) if !required() => {
                    eprintln!(
                        "SKIPPED: redis-server is not installed; this Redis test did not run"
                    );
                    return None;
                }
                Err(LaunchError::Missing) => {
                    panic!("REQUIRE_REDIS=1 but redis-server is not installed")
                }
                // Another process took the port between our probe and the launch: try another.
                Err(LaunchError::NoPing) => continue,
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    fn launch(&mut self) -> Result<(), LaunchError> {
        self.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        Err(LaunchError::NoPing)
    }

    /// Starts the process, without waiting for it to answer.
    fn spawn(&mut self) -> Result<(), LaunchError> {
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        match &self.dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
            // Its own scratch directory all the same: a replica stores the copy it syncs as
            // `dump.rdb`, which a later server started in the same directory would load.
            None => command
                .args(["--appendonly", "no", "--dir"])
                .arg(self.scratch()),
        };
        let child = command
            .args(["--protected-mode", "yes", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|_| LaunchError::Missing)?;
        self.child = Some(child);
        Ok(())
    }

    fn scratch_path(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "turnstile-redis-scratch-{}-{}",
            std::process::id(),
            self.port
        ))
    }

    /// The directory a server without persistence works in, created if need be.
    fn scratch(&self) -> std::path::PathBuf {
        let dir = self.scratch_path();
        std::fs::create_dir_all(&dir).expect("temporary directory");
        dir
    }

    fn ping(&self) -> bool {
        // A server that wants a password is up too.
        self.raw("PING")
            .is_some_and(|reply| reply.starts_with("+PONG") || reply.starts_with("-NOAUTH"))
    }

    /// Sends one inline command and returns the first reply line.
    pub fn raw(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        Some(line)
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            command.args(["-a", password, "--no-auth-warning"]);
        }
        let out = command.args(args).output().expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port: empty, unless it was started persistent.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(_) => panic!("redis-server did not restart on port {}", self.port),
            }
        }
    }

    /// Restarts the server to load what it saved (`SAVE` first) slowly, `per_key` for each
    /// key, answering `LOADING` meanwhile; returns once it does.
    pub fn restart_loading_slowly(&mut self, per_key: Duration) {
        self.kill();
        let delay = per_key.as_micros().to_string();
        let slow = [
            "--key-load-delay",
            delay.as_str(),
            "--loading-process-events-interval-bytes",
            "1024",
        ];
        self.extra.extend(slow.iter().map(|arg| (*arg).to_owned()));
        let launched = self.spawn();
        self.extra.truncate(self.extra.len() - slow.len());
        launched.expect("redis-server restarts");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self
            .raw("PING")
            .is_some_and(|reply| reply.starts_with("-LOADING"))
        {
            assert!(Instant::now() < deadline, "redis-server is not loading");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("server running")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Starts recording every command clients send (script-internal commands excluded).
    pub fn monitor(&self) -> Monitor {
        Monitor::start(self)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server would ignore SIGKILL's cleanup of its sockets no differently, but
        // make sure it is not left stopped for the next run's port probe.
        if self.child.is_some() {
            let _ = Command::new("kill")
                .args([
                    "-CONT",
                    &self
                        .child
                        .as_ref()
                        .map(|c| c.id().to_string())
                        .unwrap_or_default(),
                ])
                .status();
        }
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir_all(self.scratch_path());
    }
}

#[derive(Debug)]
enum LaunchError {
    Missing,
    NoPing,
}

/// Records the commands clients send to a server, through `MONITOR`.
#[derive(Debug)]
pub struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    port: u16,
    marks: AtomicU64,
}

impl Monitor {
    fn start(server: &RedisServer) -> Self {
        let mut child = Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli runs");
        let stdout = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let monitor = Self {
            child,
            lines,
            port: server.port,
            marks: AtomicU64::new(0),
        };
        // Wait until MONITOR is live: it echoes our own marker command.
        monitor.take();
        monitor
    }

    /// The client commands seen since the last call, in order, as upper-case names with their
    /// arguments (`EVALSHA <sha> 1 key ...`). Script-internal commands are left out, and so
    /// are `PING`s: a backend that keeps local copies pings a quiet connection on its own.
    pub fn take(&self) -> Vec<String> {
        let mark = format!(
            "turnstile-mark-{}",
            self.marks.fetch_add(1, Ordering::Relaxed)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // Keep sending the mark until it shows up: the first ones may precede MONITOR.
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
            stream
                .write_all(format!("ECHO {mark}\r\n").as_bytes())
                .unwrap();
            let mut reply = String::new();
            let _ = BufReader::new(stream).read_line(&mut reply);
            thread::sleep(Duration::from_millis(20));
            let mut lines = self.lines.lock().unwrap();
            if let Some(at) = lines.iter().position(|l| l.contains(&mark)) {
                let seen: Vec<String> = lines.drain(..=at).collect();
                return seen
                    .into_iter()
                    .filter(|l| {
                        !l.contains("[0 lua]") && !l.contains("turnstile-mark-") && l.contains('"')
                    })
                    .filter_map(|l| l.split_once("] ").map(|(_, cmd)| cmd.replace('"', "")))
                    .filter(|cmd| cmd != "PING")
                    .collect();
            }
            assert!(Instant::now() < deadline, "MONITOR did not echo the mark");
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Sentinel-managed group on loopback: a master, one replica and three sentinels (quorum 2,
/// the master judged down after 500 ms without answers), monitoring the master as `turnstile`.
#[derive(Debug)]
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(Child, u16)>,
    dir: std::path::PathBuf,
}

impl SentinelGroup {
    pub const MASTER: &str = "turnstile";

    /// Starts the group and waits until every sentinel knows the replica and the other
    /// sentinels (so a failover can happen), or returns `None` when `redis-server` is missing
    /// and Redis is not required.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    /// The same group, its master and replica requiring `password` (the sentinels know it).
    pub fn start_with_password(password: &str) -> Option<Self> {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> Option<Self> {
        let (master, replica) = match password {
            None => {
                let master = RedisServer::start()?;
                let replica = RedisServer::start_replica_of(&master)?;
                (master, replica)
            }
            Some(password) => {
                let master =
                    RedisServer::start_with_password(password, &["--masterauth", password])?;
                let port = master.port().to_string();
                let replica = RedisServer::start_with_password(
                    password,
                    &["--masterauth", password, "--replicaof", "127.0.0.1", &port],
                )?;
                (master, replica)
            }
        };
        let auth = password
            .map(|password| format!("sentinel auth-pass {} {password}\n", Self::MASTER))
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "turnstile-sentinel-{}-{}",
            std::process::id(),
            master.port()
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let mut sentinels = Vec::new();
        for n in 0..3 {
            let port = free_port();
            let config = dir.join(format!("sentinel-{n}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {name} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {name} 500\n\
                     sentinel failover-timeout {name} 5000\n\
                     sentinel parallel-syncs {name} 1\n{auth}",
                    dir = dir.display(),
                    name = Self::MASTER,
                    master = master.port(),
                ),
            )
            .expect("write a sentinel's configuration");
            let child = Command::new("redis-server")
                .arg(&config)
                .args(["--sentinel", "--loglevel", "warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs as a sentinel");
            sentinels.push((child, port));
        }
        let group = Self {
            master,
            replica,
            sentinels,
            dir,
        };
        group.wait_until(
            "the replica is in sync and every sentinel knows the group",
            || {
                group
                    .replica
                    .cli(&["INFO", "replication"])
                    .contains("master_link_status:up")
                    && group.sentinels.iter().all(|&(_, port)| {
                        let replicas = sentinel_cli(port, &["SENTINEL", "REPLICAS", Self::MASTER]);
                        let peers = sentinel_cli(port, &["SENTINEL", "SENTINELS", Self::MASTER]);
                        replicas.contains(&group.replica.port().to_string())
                            && peers.matches("name").count() == 2
                    })
            },
        );
        Some(group)
    }

    /// The first sentinel's URL.
    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinels[0].1)
    }

    /// Every sentinel's URL, for `RedisBackend::sentinel`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// Runs `redis-cli` against the first sentinel.
    pub fn sentinel_cli(&self, args: &[&str]) -> String {
        sentinel_cli(self.sentinels[0].1, args)
    }

    /// The port of the server the sentinels name as master now.
    pub fn master_port(&self) -> Option<u16> {
        let reply = self.sentinel_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER]);
        reply
            .lines()
            .nth(1)
            .and_then(|port| port.trim().parse().ok())
    }

    /// Waits until every write the master took has reached the replica.
    pub fn sync(&self) {
        let acked = self.master.cli(&["WAIT", "1", "2000"]);
        assert_eq!(
            acked.trim(),
            "1",
            "the replica did not acknowledge the writes"
        );
    }

    /// Has the sentinels fail over to the replica, and waits until they name it.
    pub fn fail_over(&self) {
        self.sentinel_cli(&["SENTINEL", "FAILOVER", Self::MASTER]);
        self.wait_for_replica_promotion();
    }

    /// Waits until the sentinels name the replica as master.
    pub fn wait_for_replica_promotion(&self) {
        let replica = self.replica.port();
        self.wait_until("the sentinels name the replica as master", || {
            self.master_port() == Some(replica) && self.replica.cli(&["ROLE"]).starts_with("master")
        });
    }

    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sentinel_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        for (child, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster on loopback: three masters, each with one replica, created with
/// `redis-cli --cluster create`. Nodes judge a peer failed after 1 s; the cluster keeps serving
/// the slots of its live masters while one is down (`cluster-require-full-coverage no`).
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dirs: Vec<std::path::PathBuf>,
}

impl RedisCluster {
    /// Starts and creates the cluster and waits until every node reports `cluster_state:ok`,
    /// or returns `None` when `redis-server` is missing and Redis is not required.
    pub fn start() -> Option<Self> {
        Self::start_with(true, None)
    }

    /// The same cluster without replicas: three masters.
    pub fn start_masters_only() -> Option<Self> {
        Self::start_with(false, None)
    }

    /// Three masters whose default user needs `password`.
    pub fn start_masters_only_with_password(password: &str) -> Option<Self> {
        Self::start_with(false, Some(password))
    }

    fn start_with(replicas: bool, password: Option<&str>) -> Option<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..if replicas { 6 } else { 3 } {
            let dir = std::env::temp_dir().join(format!(
                "turnstile-cluster-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("temporary directory");
            let extra = vec![
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout".to_owned(),
                "1000".to_owned(),
                "--cluster-require-full-coverage".to_owned(),
                "no".to_owned(),
                // A replica of a fresh, idle cluster counts its data as too old to fail over
                // unless this check is off.
                "--cluster-replica-validity-factor".to_owned(),
                "0".to_owned(),
                // Replicas sync at once instead of after the default 5 s wait for company.
                "--repl-diskless-sync-delay".to_owned(),
                "0".to_owned(),
                "--dir".to_owned(),
                dir.display().to_string(),
            ];
            let mut extra = extra;
            if let Some(password) = password {
                extra.extend(
                    ["--requirepass", password, "--masterauth", password].map(str::to_owned),
                );
            }
            let mut node = RedisServer::start_with_args(false, extra)?;
            node.password = password.map(str::to_owned);
            nodes.push(node);
            dirs.push(dir);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(password) = password {
            create.args(["-a", password, "--no-auth-warning"]);
        }
        let created = create
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", if replicas { "1" } else { "0" }])
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes, dirs };
        cluster.wait_until_ok();
        Some(cluster)
    }

    /// Seed URLs (every node's).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes that are masters now (by `ROLE`).
    pub fn masters(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some() && node.cli(&["ROLE"]).starts_with("master"))
            .collect()
    }

    /// The number of keys on each master, in the order of [`RedisCluster::masters`].
    pub fn keys_per_master(&self) -> Vec<usize> {
        self.masters()
            .iter()
            .map(|node| node.cli(&["DBSIZE"]).trim().parse().unwrap_or(0))
            .collect()
    }

    /// Every key on every master.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .masters()
            .iter()
            .flat_map(|node| {
                node.cli(&["--scan"])
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        keys.sort();
        keys
    }

    /// Waits until every live node says `cluster_state:ok`, three are masters, and every
    /// live replica is in sync with its master (so that what a master acknowledged from now
    /// on reaches its replica within milliseconds).
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let live = || self.nodes.iter().filter(|n| n.child.is_some());
            let ok = live().all(|node| node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                && self.masters().len() == 3
                && live().all(|node| {
                    let replication = node.cli(&["INFO", "replication"]);
                    replication.contains("role:master")
                        || replication.contains("master_link_status:up")
                });
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                let states: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .map(|node| {
                        let info = node.cli(&["CLUSTER", "INFO"]);
                        let state = info
                            .lines()
                            .find(|l| l.starts_with("cluster_state"))
                            .unwrap_or("?")
                            .trim()
                            .to_owned();
                        let role = node.cli(&["ROLE"]).lines().next().unwrap_or("?").to_owned();
                        format!("{}: {role} {state}", node.port())
                    })
                    .collect();
                panic!("the cluster did not become ok: {states:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the master at `index` of [`RedisCluster::masters`] and returns its port.
    pub fn kill_master(&mut self, index: usize) -> u16 {
        let port = self.masters()[index].port();
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port() == port)
            .expect("a node");
        node.stop();
        port
    }

    /// Flushes every master.
    pub fn flush(&self) {
        for node in self.masters() {
            node.cli(&["FLUSHALL"]);
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
