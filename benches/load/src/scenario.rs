//! What the harness runs: a stack (a server process per instance) under one route.

/// One stack under one route, on one or more server processes.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub stack: &'static str,
    pub route: Route,
    /// How many server processes of `stack` share the load: each has its own Redis
    /// connections and its own local copy of sessions, as separate instances of a service do.
    pub instances: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /read` with a session cookie (when the stack has sessions).
    Read,
    /// `POST /write` with a session cookie.
    Write,
}

impl Route {
    pub fn method_and_path(self) -> (&'static str, &'static str) {
        match self {
            Self::Read => ("GET", "/read"),
            Self::Write => ("POST", "/write"),
        }
    }
}

impl Scenario {
    const fn new(stack: &'static str, route: Route) -> Self {
        Self::spread(stack, 1, route)
    }

    /// `stack` on `instances` server processes, under one load (see [`crate::wrk`]).
    const fn spread(stack: &'static str, instances: usize, route: Route) -> Self {
        Self {
            stack,
            route,
            instances,
        }
    }

    /// `stack/route`, or `stack-2x/route` on two instances.
    pub fn name(&self) -> String {
        let route = match self.route {
            Route::Read => "read",
            Route::Write => "write",
        };
        if self.instances > 1 {
            format!("{}-{}x/{route}", self.stack, self.instances)
        } else {
            format!("{}/{route}", self.stack)
        }
    }

    /// Whether the stack has sessions, by its name (`…session…` or `…-stack`): the harness
    /// seeds them and sends their cookies.
    pub fn has_sessions(&self) -> bool {
        self.stack.contains("session") || self.stack.contains("-stack")
    }

    /// Whether the stack keeps a local copy of our sessions, whose counters the server
    /// answers on `GET /copy-stats`.
    pub fn has_local_copy(&self) -> bool {
        self.stack.ends_with("-copy")
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
    Scenario::new("ours-session-copy", Route::Read),
    Scenario::spread("ours-session-copy", 2, Route::Read),
    Scenario::new("ts-session", Route::Read),
    Scenario::new("ts-session-always-save", Route::Read),
    Scenario::new("ts-session-memory", Route::Read),
    Scenario::new("ours-session", Route::Write),
    Scenario::new("ours-session-copy", Route::Write),
    Scenario::spread("ours-session-copy", 2, Route::Write),
    Scenario::new("ts-session", Route::Write),
    Scenario::new("ts-session-memory", Route::Write),
    Scenario::new("ours-ratelimit", Route::Read),
    Scenario::new("governor-allow", Route::Read),
    Scenario::new("ours-deny", Route::Read),
    Scenario::new("governor-deny", Route::Read),
    Scenario::new("ours-stack", Route::Read),
    Scenario::new("ours-ratelimit-lease", Route::Read),
    Scenario::new("ours-stack-lease", Route::Read),
    Scenario::new("ours-stack-copy", Route::Read),
    Scenario::new("ours-stack-lease-copy", Route::Read),
    Scenario::new("ts-stack", Route::Read),
];
