use std::{
    fmt,
    future::Future,
    mem,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{
    Answer,
    headers::{RATELIMIT, RATELIMIT_POLICY, policy_value, ratelimit_value, retry_after_secs},
    key::tenant_of,
    layer::{RateLimited, Rejection, Shared},
    limiter::Verdict,
    policy::MissingKey,
    quota::Quota,
    settle::{self, Reservation},
    store::{Check, Client, CounterKey, Decision},
};
use crate::{
    http::{
        GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE, RefusalBody, RequestView, grpc_status, is_grpc,
        plain_response, polled_after_completion,
    },
    tenant::Tenant,
};

/// The service of a [`RateLimitLayer`](super::RateLimitLayer).
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for RateLimitService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S> RateLimitService<S> {
    inner_service_accessors!();

    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

/// What the service keeps for after the decision: the key as a shadow logs it, and the check
/// whose cost the response will settle.
struct Followup {
    shown: Option<String>,
    settle: Option<Check>,
}

/// What becomes of a request of `client` in `tenant` costing `cost`; the check, when its cost
/// will be settled.
fn decide(
    shared: &Shared,
    tenant: &Tenant,
    client: Option<Client>,
    cost: u64,
) -> (Answer<Verdict>, Option<Check>) {
    let client = match client {
        Some(client) => client,
        None => {
            if !shared.warned_missing_key.load(Ordering::Relaxed)
                && !shared.warned_missing_key.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    target: "tower_turnstile::ratelimit",
                    policy = shared.policy.name(),
                    missing_key = ?shared.policy.missing_key,
                    "a request had no rate-limit key (is the peer address recorded? see ClientIp)"
                );
            }
            match shared.policy.missing_key {
                MissingKey::Allow => return (Answer::ready(Verdict::Pass), None),
                MissingKey::Deny => return (Answer::ready(Verdict::NoKey), None),
                _ => Client::from("(no key)"),
            }
        }
    };
    let quota = shared.policy.quota_for(tenant);
    let key = CounterKey::new(tenant.clone(), Arc::clone(&shared.scope), client);
    let mut check = Check::new(key, quota, shared.policy.algorithm(), cost);
    check.penalty = shared.policy.penalty;
    let settles = shared.policy.settlement.is_some();
    let settle = settles.then(|| check.clone());
    (shared.limiter.decide(check, !settles), settle)
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + RefusalBody + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let view = RequestView::new(&request);
        if self.shared.policy.skips(&view) {
            return ResponseFuture::inner(self.inner.call(request), None);
        }
        let cost = self.shared.policy.cost_of(&view);
        match self.shared.policy.key.extract(&view).now() {
            Ok(client) if allowlisted(&self.shared, client.as_ref(), &request) => {
                ResponseFuture::inner(self.inner.call(request), None)
            }
            Ok(client) => {
                let shown = shadow_key(&self.shared, client.as_ref());
                let (verdict, settle) =
                    decide(&self.shared, tenant_of(request.extensions()), client, cost);
                let followup = Followup { shown, settle };
                respond(&mut self.inner, &self.shared, request, verdict, followup)
            }
            Err(client) => {
                // The key needs I/O (the session's user, say): find it in a future, which
                // takes the inner service that was made ready (a clone takes its place).
                let mut inner = take_ready(&mut self.inner);
                let shared = Arc::clone(&self.shared);
                ResponseFuture::boxed(Box::pin(async move {
                    let tenant = tenant_of(request.extensions());
                    let client = client.await;
                    if allowlisted(&shared, client.as_ref(), &request) {
                        return inner.call(request).await;
                    }
                    let shown = shadow_key(&shared, client.as_ref());
                    let (verdict, settle) = decide(&shared, tenant, client, cost);
                    let followup = Followup { shown, settle };
                    respond(&mut inner, &shared, request, verdict, followup).await
                }))
            }
        }
    }
}

/// Whether the policy's allowlist lets the client through uncounted.
fn allowlisted<B>(shared: &Shared, client: Option<&Client>, request: &Request<B>) -> bool {
    if shared.policy.allowlist.is_none() {
        return false;
    }
    let peer = crate::http::peer_addr(request.extensions());
    client.is_some_and(|client| shared.policy.allows(&client.to_string(), peer))
}

/// The request's key as a shadow layer logs it; nothing for a layer that refuses.
fn shadow_key(shared: &Shared, client: Option<&Client>) -> Option<String> {
    shared.shadow.as_ref()?;
    client.map(ToString::to_string)
}

/// The ready service, to move into a future; a clone of it takes its place.
pub(super) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    mem::replace(inner, clone)
}

/// What the verdict means for the request: the inner service's answer (with the `RateLimit`
/// fields when allowed), a refusal, or, when the verdict comes later, a future of either.
fn respond<S, ReqBody, ResBody>(
    inner: &mut S,
    shared: &Arc<Shared>,
    request: Request<ReqBody>,
    verdict: Answer<Verdict>,
    followup: Followup,
) -> ResponseFuture<S::Future, ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + RefusalBody + Send + 'static,
{
    let verdict = match verdict.now() {
        Ok(verdict) => verdict,
        Err(later) => {
            let mut inner = take_ready(inner);
            let shared = Arc::clone(shared);
            return ResponseFuture::boxed(Box::pin(async move {
                let verdict = Answer::ready(later.await);
                respond(&mut inner, &shared, request, verdict, followup).await
            }));
        }
    };
    // gRPC or not matters only for a refusal: the header is looked at only then.
    let grpc = |request: &Request<ReqBody>| is_grpc(request.headers());
    if let Some(headers) = shadow_pass(shared, &verdict, followup.shown.as_deref()) {
        return ResponseFuture::inner(inner.call(request), headers);
    }
    match verdict {
        Verdict::Pass => ResponseFuture::inner(inner.call(request), None),
        Verdict::NoKey => ResponseFuture::ready(refuse(shared, None, grpc(&request))),
        Verdict::Decided(decision, quota, ledger) if decision.allowed => {
            crate::metrics::count("turnstile_ratelimit_allowed_total", 1);
            if let Some(check) = followup.settle {
                let reservation = Reservation::new(check, decision, quota, ledger);
                let settled = settle::after(inner.call(request), Arc::clone(shared), reservation);
                return ResponseFuture::boxed(Box::pin(settled));
            }
            let headers = shared
                .headers
                .then(|| allowed_headers(shared, quota, &decision));
            ResponseFuture::inner(inner.call(request), headers)
        }
        Verdict::Decided(decision, quota, _) => {
            ResponseFuture::ready(refuse(shared, Some((&decision, quota)), grpc(&request)))
        }
        Verdict::Unavailable => ResponseFuture::ready(unavailable(shared, grpc(&request))),
    }
}

pub(super) type HeaderPair = (HeaderValue, HeaderValue);

/// A shadow refuses nobody: for a verdict that would refuse, counts it and gives the fields a
/// refusal would carry (the request goes on with them). `None`: the verdict stands.
fn shadow_pass(
    shared: &Shared,
    verdict: &Verdict,
    shown: Option<&str>,
) -> Option<Option<HeaderPair>> {
    let shadow = shared.shadow.as_ref()?;
    let policy = shared.policy.name();
    match verdict {
        Verdict::Decided(decision, quota, _) if !decision.allowed => {
            shadow.would_refuse(policy, shown, Some(decision));
            Some(
                shared
                    .headers
                    .then(|| allowed_headers(shared, *quota, decision)),
            )
        }
        Verdict::NoKey | Verdict::Unavailable => {
            shadow.would_refuse(policy, shown, None);
            Some(None)
        }
        _ => None,
    }
}

pub(super) fn allowed_headers(shared: &Shared, quota: Quota, decision: &Decision) -> HeaderPair {
    (
        policy_header(shared, quota),
        ratelimit_value(shared.policy.name(), decision),
    )
}

/// `RateLimit-Policy` for the quota the decision was made under (a tenant's plan may differ
/// from the policy's default).
fn policy_header(shared: &Shared, quota: Quota) -> HeaderValue {
    if quota == shared.policy.quota() {
        shared.policy_header.clone()
    } else {
        policy_value(shared.policy.name(), quota.limit(), quota.window())
    }
}

pub(super) fn add_headers<B>(response: &mut Response<B>, (policy, state): HeaderPair) {
    // Appended, not inserted: stacked layers each report their own policy.
    response.headers_mut().append(&RATELIMIT_POLICY, policy);
    response.headers_mut().append(&RATELIMIT, state);
}

fn refuse<B: RefusalBody>(
    shared: &Shared,
    decided: Option<(&Decision, Quota)>,
    grpc: bool,
) -> Response<B> {
    crate::metrics::count("turnstile_ratelimit_denied_total", 1);
    let policy = shared.policy.name();
    let fallback;
    let (decision, quota) = match decided {
        Some(decided) => decided,
        None => {
            // Refused for lack of a key: report the quota as spent, with no retry time.
            let quota = shared.policy.quota();
            fallback = Decision::denied(quota.limit(), 0, quota.window(), None);
            (&fallback, quota)
        }
    };
    let mut response = match &shared.rejection {
        Some(custom) => custom(&Rejection {
            policy,
            decision,
            grpc,
        })
        .map(B::from_bytes),
        None if grpc => grpc_status(GRPC_RESOURCE_EXHAUSTED, "rate limit exceeded"),
        None if decision.retry_after.is_none() && decision.limit > 0 => plain_response(
            StatusCode::TOO_MANY_REQUESTS,
            "request cost exceeds the rate limit\n",
        ),
        None => plain_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded\n"),
    };
    let headers = response.headers_mut();
    if let Some(wait) = decision.retry_after
        && !headers.contains_key(header::RETRY_AFTER)
    {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(wait)),
        );
    }
    if shared.headers && !headers.contains_key(&RATELIMIT) {
        headers.append(&RATELIMIT_POLICY, policy_header(shared, quota));
        headers.append(&RATELIMIT, ratelimit_value(policy, decision));
    }
    response.extensions_mut().insert(RateLimited {
        policy: Arc::clone(&shared.policy.name),
        decision: Some(*decision),
    });
    response
}

fn unavailable<B: RefusalBody>(shared: &Shared, grpc: bool) -> Response<B> {
    let mut response = if grpc {
        grpc_status(GRPC_UNAVAILABLE, "rate limiter unavailable")
    } else {
        plain_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "rate limiter unavailable\n",
        )
    };
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response.extensions_mut().insert(RateLimited {
        policy: Arc::clone(&shared.policy.name),
        decision: None,
    });
    response
}

pin_project! {
    /// The response future of [`RateLimitService`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Inner { #[pin] future: F, headers: Option<HeaderPair> },
        // Boxed: refusals are the rare path, and the future stays small for the common one.
        Ready { response: Option<Box<Response<B>>> },
        Boxed { future: BoxedResponse<B, E> },
        Done,
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    fn inner(future: F, headers: Option<HeaderPair>) -> Self {
        Self {
            kind: Kind::Inner { future, headers },
        }
    }

    fn ready(response: Response<B>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(Box::new(response)),
            },
        }
    }

    fn boxed(future: BoxedResponse<B, E>) -> Self {
        Self {
            kind: Kind::Boxed { future },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: RefusalBody,
{
    type Output = Result<Response<B>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match self.as_mut().project().kind.project() {
            KindProj::Inner { future, headers } => ready!(future.poll(cx)).map(|mut response| {
                if let Some(headers) = headers.take() {
                    add_headers(&mut response, headers);
                }
                response
            }),
            KindProj::Ready { response } => Ok(response
                .take()
                .map_or_else(polled_after_completion, |response| *response)),
            KindProj::Boxed { future } => ready!(future.as_mut().poll(cx)),
            KindProj::Done => return Poll::Ready(Ok(polled_after_completion())),
        };
        self.project().kind.set(Kind::Done);
        Poll::Ready(result)
    }
}
