//! What a request's session changes call for, decided without any I/O: a pure function of what
//! the request did, what is known of the stored session, and the layer's settings.

use std::collections::BTreeMap;

use super::super::{
    Expiry,
    layer::Shared,
    store::{Lifetime, Patch, Record},
};

/// What the request did to its session.
#[derive(Debug, Default, Clone)]
pub(in crate::session) struct Changes {
    /// Key → new JSON text, or `None` for a removal.
    pub(in crate::session) fields: BTreeMap<String, Option<String>>,
    /// The user `set_user` bound the session to.
    pub(in crate::session) user: Option<String>,
    /// `cycle_id` (or `set_user`) asked for a new id.
    pub(in crate::session) cycle: bool,
    pub(in crate::session) destroyed: bool,
    pub(in crate::session) expiry: Option<Expiry>,
}

/// What is known of the stored session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(in crate::session) enum Loaded {
    /// Not read (the request only wrote, or did nothing).
    #[default]
    NotYet,
    /// Read, and there was none: no cookie, or one naming a session that is gone.
    Missing,
    Found(Record),
    /// The store failed when asked.
    Failed,
    /// A write found the session gone (expired, or destroyed elsewhere) after it was read.
    Gone,
}

impl Loaded {
    fn record(&self) -> Option<&Record> {
        match self {
            Self::Found(record) => Some(record),
            _ => None,
        }
    }
}

/// Why a new session is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::session) enum Start {
    /// No live session came with the request.
    New,
    /// The request's session was gone when its changes were written: they start a new one.
    Gone,
    /// The request's session could not be read, and the layer keeps such changes in a new one
    /// (`FailurePolicy::restart_when_unavailable`).
    Unavailable,
}

/// What the commit does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::session) enum Plan {
    /// Nothing to write, no cookie to change.
    Nothing,
    /// Read the session first, then plan again: a move copies it whole, and a new expiry is
    /// compared with the stored one.
    LoadFirst,
    /// End the cookie's session (and its place in `user`'s index) and remove the cookie.
    Destroy { user: Option<String> },
    /// Store a new session holding `record`, under a new id.
    Create { record: Record, start: Start },
    /// A new session would hold nothing: none is stored, and the dead cookie is removed.
    RemoveCookie,
    /// Move the session to a new id, as `record`; the old id was indexed under `old_user`.
    Cycle {
        old_user: Option<String>,
        record: Record,
    },
    /// Write the changed fields. `resend` is the new lifetime when the cookie's attributes
    /// (its kind, its absolute end) change with it.
    Update {
        patch: Patch,
        resend: Option<Lifetime>,
    },
    /// The changes cannot be written: the session could not be read.
    Drop,
}

/// The plan for a request that changed `changes`, whose stored session is `loaded`;
/// `has_cookie` when it came with a (valid) session id, `server_error` when the inner service
/// answered `5xx`; `now` in Unix ms.
pub(in crate::session) fn plan(
    changes: &Changes,
    loaded: &Loaded,
    has_cookie: bool,
    server_error: bool,
    shared: &Shared,
    now: u64,
) -> Plan {
    if changes.destroyed {
        return match has_cookie {
            true => Plan::Destroy {
                user: loaded.record().and_then(|record| record.user.clone()),
            },
            false => Plan::Nothing,
        };
    }
    if server_error && !shared.failure.saves_on_server_error() {
        return Plan::Nothing;
    }
    let patch = changes.patch();
    let moves = changes.cycle || changes.user.is_some();
    if patch.is_empty() && !moves && changes.expiry.is_none() {
        return Plan::Nothing;
    }
    if !has_cookie {
        return new_session(changes, has_cookie, shared, now, Start::New);
    }
    match loaded {
        Loaded::NotYet if moves || changes.expiry.is_some() => Plan::LoadFirst,
        Loaded::NotYet => Plan::Update {
            patch,
            resend: None,
        },
        Loaded::Failed if may_start_over(changes, shared) => {
            new_session(changes, has_cookie, shared, now, Start::Unavailable)
        }
        Loaded::Failed => Plan::Drop,
        // The cookie named no live session, and the handler saw an empty one: this is a new
        // visitor as far as the store is concerned.
        Loaded::Missing => new_session(changes, has_cookie, shared, now, Start::New),
        Loaded::Gone => new_session(changes, has_cookie, shared, now, Start::Gone),
        Loaded::Found(record) => existing(changes, patch, record, moves, shared),
    }
}

/// The plan for changes to a session that was read.
fn existing(
    changes: &Changes,
    mut patch: Patch,
    record: &Record,
    moves: bool,
    shared: &Shared,
) -> Plan {
    let stored = record.lifetime();
    patch.lifetime = changes
        .expiry
        .map(|expiry| shared.resolve(expiry, record.created_at))
        .filter(|lifetime| *lifetime != stored);
    if moves {
        let mut moved = record.clone();
        moved.apply(&patch);
        if changes.user.is_some() {
            moved.user.clone_from(&changes.user);
        }
        return Plan::Cycle {
            old_user: record.user.clone(),
            record: moved,
        };
    }
    if patch.is_empty() {
        return Plan::Nothing;
    }
    // The cookie's attributes follow the kind and the absolute end only.
    let resend = patch
        .lifetime
        .filter(|new| (new.persistent, new.expires_at) != (stored.persistent, stored.expires_at));
    Plan::Update { patch, resend }
}

/// A brand-new session holding the request's changes, unless it would be empty.
pub(in crate::session) fn new_session(
    changes: &Changes,
    has_cookie: bool,
    shared: &Shared,
    now: u64,
    start: Start,
) -> Plan {
    let mut record = Record::new_at(now, shared.inactivity_timeout, shared.absolute_lifetime);
    record.persistent = shared.cookie.persistent;
    record.apply(&changes.patch());
    if let Some(expiry) = changes.expiry {
        record.apply(&Patch {
            lifetime: Some(shared.resolve(expiry, record.created_at)),
            ..Patch::default()
        });
    }
    record.user.clone_from(&changes.user);
    match (record.data.is_empty() && record.user.is_none(), has_cookie) {
        // An empty session is never stored and gets no cookie; a dead one is cleared.
        (true, true) => Plan::RemoveCookie,
        (true, false) => Plan::Nothing,
        (false, _) => Plan::Create { record, start },
    }
}

/// Whether changes the store could not apply to the cookie's session may go into a new one:
/// only when the layer says so, and only changes that would store something.
pub(in crate::session) fn may_start_over(changes: &Changes, shared: &Shared) -> bool {
    shared.failure.restarts_when_unavailable()
        && (changes.fields.values().any(Option::is_some) || changes.user.is_some())
}

impl Changes {
    /// The changed fields as a patch (no lifetime: that depends on the stored record).
    pub(in crate::session) fn patch(&self) -> Patch {
        Patch {
            set: self
                .fields
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                .collect(),
            remove: self
                .fields
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k.clone())
                .collect(),
            lifetime: None,
        }
    }

    /// Whether the request may have changed anything.
    pub(in crate::session) fn any(&self) -> bool {
        self.destroyed
            || self.cycle
            || self.user.is_some()
            || self.expiry.is_some()
            || !self.fields.is_empty()
    }
}

#[cfg(test)]
#[cfg(feature = "memory")] // the plan is built for a layer, and a layer needs a store
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::session::{FailurePolicy, MemoryStore, SessionLayer};

    const NOW: u64 = 1_700_000_000_000;

    fn shared(policy: FailurePolicy) -> Shared {
        let layer = SessionLayer::new(MemoryStore::new()).with_failure_policy(policy);
        layer.shared().clone()
    }

    fn set(key: &str) -> Changes {
        let mut changes = Changes::default();
        changes.fields.insert(key.into(), Some("1".into()));
        changes
    }

    fn removal() -> Changes {
        let mut changes = Changes::default();
        changes.fields.insert("k".into(), None);
        changes
    }

    fn login() -> Changes {
        Changes {
            user: Some("bob".into()),
            cycle: true,
            ..Changes::default()
        }
    }

    fn expiry(expiry: Expiry) -> Changes {
        Changes {
            expiry: Some(expiry),
            ..Changes::default()
        }
    }

    fn destroyed() -> Changes {
        Changes {
            destroyed: true,
            ..Changes::default()
        }
    }

    /// A stored session of `alice`, created at `NOW` with the layer's defaults.
    fn found() -> Loaded {
        let shared = shared(FailurePolicy::default());
        let mut record = Record::new_at(NOW, shared.inactivity_timeout, shared.absolute_lifetime);
        record.user = Some("alice".into());
        record.data.insert("old".into(), "0".into());
        Loaded::Found(record)
    }

    /// A plan in a few words, to compare against a table.
    fn summary(plan: &Plan) -> String {
        match plan {
            Plan::Nothing => "nothing".into(),
            Plan::LoadFirst => "load first".into(),
            Plan::Destroy { user } => format!("destroy {user:?}"),
            Plan::Create { record, start } => {
                format!(
                    "create {start:?} {:?} {:?}",
                    record.data.keys(),
                    record.user
                )
            }
            Plan::RemoveCookie => "remove cookie".into(),
            Plan::Cycle { old_user, record } => {
                format!(
                    "cycle from {old_user:?} to {:?} {:?}",
                    record.user,
                    record.data.keys()
                )
            }
            Plan::Update { patch, resend } => format!(
                "update {:?} {:?} resend={}",
                patch.set.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                patch.remove,
                resend.is_some()
            ),
            Plan::Drop => "drop".into(),
        }
    }

    #[test]
    fn the_plan_for_each_case() {
        let open = FailurePolicy::fail_open();
        let restart = FailurePolicy::fail_open().with_restart_when_unavailable(true);
        let save_5xx = FailurePolicy::fail_open().with_save_on_server_error(true);
        let remember = Expiry::Inactivity(Duration::from_secs(3600));
        let far = Expiry::At(SystemTime::UNIX_EPOCH + Duration::from_millis(NOW + 3_600_000));
        // (what, changes, loaded, cookie, 5xx, policy, expected)
        let table: Vec<(&str, Changes, Loaded, bool, bool, FailurePolicy, &str)> = vec![
            (
                "untouched",
                Changes::default(),
                Loaded::NotYet,
                true,
                false,
                open,
                "nothing",
            ),
            (
                "destroy, no cookie",
                destroyed(),
                Loaded::NotYet,
                false,
                false,
                open,
                "nothing",
            ),
            (
                "destroy, unread",
                destroyed(),
                Loaded::NotYet,
                true,
                false,
                open,
                "destroy None",
            ),
            (
                "destroy, read",
                destroyed(),
                found(),
                true,
                false,
                open,
                "destroy Some(\"alice\")",
            ),
            (
                "5xx",
                set("a"),
                Loaded::NotYet,
                false,
                true,
                open,
                "nothing",
            ),
            (
                "5xx, saved",
                set("a"),
                Loaded::NotYet,
                false,
                true,
                save_5xx,
                "create New [\"a\"] None",
            ),
            (
                "new visitor",
                set("a"),
                Loaded::NotYet,
                false,
                false,
                open,
                "create New [\"a\"] None",
            ),
            (
                "new visitor, removal",
                removal(),
                Loaded::NotYet,
                false,
                false,
                open,
                "nothing",
            ),
            (
                "blind write",
                set("a"),
                Loaded::NotYet,
                true,
                false,
                open,
                "update [\"a\"] [] resend=false",
            ),
            (
                "blind removal",
                removal(),
                Loaded::NotYet,
                true,
                false,
                open,
                "update [] [\"k\"] resend=false",
            ),
            (
                "login, unread",
                login(),
                Loaded::NotYet,
                true,
                false,
                open,
                "load first",
            ),
            (
                "expiry, unread",
                expiry(remember),
                Loaded::NotYet,
                true,
                false,
                open,
                "load first",
            ),
            (
                "dead cookie",
                set("a"),
                Loaded::Missing,
                true,
                false,
                open,
                "create New [\"a\"] None",
            ),
            (
                "dead cookie, removal",
                removal(),
                Loaded::Missing,
                true,
                false,
                open,
                "remove cookie",
            ),
            (
                "unreadable",
                set("a"),
                Loaded::Failed,
                true,
                false,
                open,
                "drop",
            ),
            (
                "unreadable, restart",
                set("a"),
                Loaded::Failed,
                true,
                false,
                restart,
                "create Unavailable [\"a\"] None",
            ),
            (
                "unreadable, restart, removal",
                removal(),
                Loaded::Failed,
                true,
                false,
                restart,
                "drop",
            ),
            (
                "gone on write",
                set("a"),
                Loaded::Gone,
                true,
                false,
                open,
                "create Gone [\"a\"] None",
            ),
            (
                "login",
                login(),
                found(),
                true,
                false,
                open,
                "cycle from Some(\"alice\") to Some(\"bob\") [\"old\"]",
            ),
            (
                "write",
                set("a"),
                found(),
                true,
                false,
                open,
                "update [\"a\"] [] resend=false",
            ),
            (
                "expiry unchanged",
                expiry(Expiry::BrowserSession),
                found(),
                true,
                false,
                open,
                "nothing",
            ),
            (
                "remember me",
                expiry(remember),
                found(),
                true,
                false,
                open,
                "update [] [] resend=true",
            ),
            (
                "an end in an hour",
                expiry(far),
                found(),
                true,
                false,
                open,
                "update [] [] resend=true",
            ),
        ];
        for (what, changes, loaded, cookie, server_error, policy, expected) in table {
            let plan = plan(
                &changes,
                &loaded,
                cookie,
                server_error,
                &shared(policy),
                NOW,
            );
            assert_eq!(summary(&plan), expected, "{what}");
        }
    }

    #[test]
    fn a_new_session_takes_the_chosen_expiry_from_its_own_creation() {
        let shared = shared(FailurePolicy::default());
        let mut changes = set("a");
        changes.expiry = Some(Expiry::Inactivity(Duration::from_secs(60)));
        let Plan::Create { record, .. } =
            plan(&changes, &Loaded::Missing, true, false, &shared, NOW)
        else {
            panic!("a new session");
        };
        assert_eq!(record.created_at, NOW);
        assert_eq!(record.inactivity_timeout, Duration::from_secs(60));
        assert!(record.persistent);
        assert_eq!(
            record.expires_at,
            NOW + crate::time::millis(shared.absolute_lifetime)
        );
    }
}
