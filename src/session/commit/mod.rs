//! Writing back what a request changed, once its handler has answered.
//!
//! - `plan`: what the changes call for, decided without I/O from what the request did, what
//!   is known of the stored session and the layer's settings (unit-tested from a table).
//! - `apply`: carries a plan out against the store, and plans again when the store's answer
//!   brings news (the session turned out to be gone).

mod apply;
mod plan;

use std::time::Duration;

pub(super) use plan::{Changes, Loaded};

use super::{SessionEvent, id::SessionId};

/// What the layer must do with the client's cookie once the session is written.
#[derive(Debug)]
pub(crate) enum CookieChange {
    Keep,
    /// Hand `id` to the client: a persistent cookie living this long, or a browser-session
    /// cookie (`None`).
    Set(SessionId, Option<Duration>),
    Remove,
}

/// The result of writing a session: the cookie to send, and what happened.
#[derive(Debug)]
pub(crate) struct Committed {
    pub(crate) cookie: CookieChange,
    pub(crate) event: Option<SessionEvent>,
}

impl Committed {
    const NOTHING: Self = Self {
        cookie: CookieChange::Keep,
        event: None,
    };
    const FAILED: Self = Self {
        cookie: CookieChange::Keep,
        event: Some(SessionEvent::Failed),
    };

    fn new(cookie: CookieChange, event: SessionEvent) -> Self {
        Self {
            cookie,
            event: Some(event),
        }
    }
}
