//! Costs settled after the response: the service's side of
//! [`Policy::with_settlement`](super::Policy::with_settlement).

use std::{future::Future, sync::Arc};

use http::Response;
use http_body::Body;

use super::{
    layer::Shared,
    limiter::Ledger,
    quota::Quota,
    service::{add_headers, allowed_headers},
    store::{Check, Decision},
};
use crate::http::ResponseView;

/// An allowed request's reservation: the check that reserved its cost, the decision, and
/// where the cost was counted.
pub(super) struct Reservation {
    check: Check,
    decision: Decision,
    quota: Quota,
    ledger: Ledger,
}

impl Reservation {
    pub(super) fn new(check: Check, decision: Decision, quota: Quota, ledger: Ledger) -> Self {
        Self {
            check,
            decision,
            quota,
            ledger,
        }
    }
}

/// The inner service's response, once the reservation is settled to what the response says
/// the request cost; the `RateLimit` fields show the settled count. A settlement the store
/// cannot make leaves the reservation, and the fields, as they were.
pub(super) async fn after<F, B, E>(
    response: F,
    shared: Arc<Shared>,
    reservation: Reservation,
) -> Result<Response<B>, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    let mut response = response.await?;
    let Reservation {
        check,
        decision,
        quota,
        ledger,
    } = reservation;
    let actual = shared
        .policy
        .actual_cost(&ResponseView::new(&response))
        .unwrap_or(check.cost);
    let settled = if actual == check.cost {
        decision
    } else {
        shared
            .limiter
            .settle(check, &decision, ledger, actual)
            .await
            .unwrap_or(decision)
    };
    if shared.headers {
        add_headers(&mut response, allowed_headers(&shared, quota, &settled));
    }
    Ok(response)
}
