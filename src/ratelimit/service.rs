use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    future::Future,
    mem,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderValue, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower_service::Service;

use super::{
    headers::{
        GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE, RATELIMIT, RATELIMIT_POLICY, grpc_status,
        is_grpc, policy_value, ratelimit_value, retry_after_secs,
    },
    key::{Extracted, RequestView, tenant_of},
    layer::{RateLimited, Rejection, Shared},
    limiter::Verdict,
    policy::MissingKey,
    quota::Quota,
    store::{Check, Decision, KeyParts},
};
use crate::{
    body::{RefusalBody, plain_response},
    tenant::Tenant,
};

/// The service of a [`RateLimitLayer`](super::RateLimitLayer).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

/// The longest client key kept as it is; longer ones (and odd ones) are hashed, so a client
/// cannot make keys of any size or shape.
const MAX_RAW_KEY: usize = 128;

/// A request's key, as the extractor gave it.
enum Key {
    Text(String),
    Address(IpAddr),
}

/// The counter's full key: tenant, policy and algorithm fold in, so that tenants never share a
/// counter and a policy that changes algorithm never reads a counter of another shape.
fn counter_key(shared: &Shared, tenant: &Tenant, key: &Key, counter: &mut String) {
    // Built by hand into a reused buffer: this runs on every request, and `format!` with a
    // fresh allocation costs more than the decision itself.
    counter.clear();
    counter.push_str(tenant.as_str());
    counter.push_str(&shared.key_infix);
    match key {
        Key::Address(ip) => {
            // Into the buffer, with no string of its own; writing to a `String` cannot fail.
            let _ = write!(counter, "{ip}");
        }
        Key::Text(key) => {
            let plain = key.len() <= MAX_RAW_KEY
                && key
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
            if plain {
                counter.push_str(key);
            } else {
                counter.push('#');
                counter.push_str(&URL_SAFE_NO_PAD.encode(Sha256::digest(key.as_bytes())));
            }
        }
    }
}

/// What the service does with a request once the key is known.
enum Plan {
    /// No limit applies (no key, and the policy lets such requests through).
    Pass,
    /// Refused outright (no key, and the policy refuses such requests).
    Refuse,
    /// Check the counter (written into the caller's buffer) against this quota.
    Check(Quota),
}

/// Decides what to do and writes the counter's key into `counter`.
fn plan(shared: &Shared, tenant: &Tenant, key: Option<Key>, counter: &mut String) -> Plan {
    let quota = shared.policy.quota_for(tenant);
    match key {
        Some(key) => {
            counter_key(shared, tenant, &key, counter);
            Plan::Check(quota)
        }
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
                MissingKey::Allow => Plan::Pass,
                MissingKey::Deny => Plan::Refuse,
                _ => {
                    counter_key(shared, tenant, &Key::Text("(no key)".to_owned()), counter);
                    Plan::Check(quota)
                }
            }
        }
    }
}

/// What the fast path found, once the shared key buffer is released again (the inner service,
/// which may hold another rate-limit layer, is called only after that).
enum Outcome {
    Pass,
    Refuse,
    Decided(Verdict, Quota),
    /// The store needs I/O: decide in a future, on this owned copy of the counter's key.
    Later(String, Quota),
}

/// The fast path for an address key and an in-memory store: the store takes the key in parts,
/// so no string is built. `None` when either is not the case.
fn decide_address(
    shared: &Shared,
    tenant: &Tenant,
    key: Option<&Key>,
    cost: u64,
) -> Option<Outcome> {
    let Some(&Key::Address(address)) = key else {
        return None;
    };
    let quota = shared.policy.quota_for(tenant);
    let parts = KeyParts {
        tenant,
        scope: &shared.key_infix,
        address,
    };
    let check = Check::of_address(parts, quota, shared.policy.algorithm(), cost);
    let verdict = match shared.limiter.memory()?.decide(&check) {
        Ok(decision) => Verdict::Decided(decision),
        Err(error) => shared.limiter.fall_back(&check, &error),
    };
    Some(Outcome::Decided(verdict, quota))
}

thread_local! {
    /// The counter key of the request being decided on this thread, reused across requests.
    static COUNTER: RefCell<String> = const { RefCell::new(String::new()) };
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: RefusalBody + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Borrowed: only the paths that decide inside a future take a reference count.
        let shared = &self.shared;
        let view = RequestView::new(&request);
        let cost = shared.policy.cost_of(&view);
        let key = match shared.policy.key.extract(&view) {
            Extracted::Ready(key) => key.map(Key::Text),
            Extracted::Address(ip) => Some(Key::Address(ip)),
            Extracted::Pending(pending) => {
                // The key needs I/O: decide inside a future, and call the inner service from
                // there (the clone-and-replace idiom keeps the service that was made ready).
                let clone = self.inner.clone();
                let inner = mem::replace(&mut self.inner, clone);
                let shared = Arc::clone(shared);
                return ResponseFuture::boxed(Box::pin(async move {
                    let key = pending.await.map(Key::Text);
                    let mut counter = String::new();
                    let outcome =
                        match plan(&shared, tenant_of(request.extensions()), key, &mut counter) {
                            Plan::Pass => Outcome::Pass,
                            Plan::Refuse => Outcome::Refuse,
                            Plan::Check(quota) => Outcome::Later(counter, quota),
                        };
                    decide_then_call(shared, inner, request, outcome, cost).await
                }));
            }
        };
        let tenant = tenant_of(request.extensions());
        let outcome = match decide_address(shared, tenant, key.as_ref(), cost) {
            Some(outcome) => outcome,
            None => {
                let decide = |counter: &mut String| match plan(shared, tenant, key, counter) {
                    Plan::Pass => Outcome::Pass,
                    Plan::Refuse => Outcome::Refuse,
                    Plan::Check(quota) => {
                        let check = Check::new(counter, quota, shared.policy.algorithm(), cost);
                        match shared.limiter.decide_now(&check) {
                            Some(verdict) => Outcome::Decided(verdict, quota),
                            None => Outcome::Later(counter.clone(), quota),
                        }
                    }
                };
                COUNTER.with(|buffer| match buffer.try_borrow_mut() {
                    Ok(mut counter) => decide(&mut counter),
                    // Only if a key extractor or quota lookup re-entered a rate-limit layer.
                    Err(_) => decide(&mut String::new()),
                })
            }
        };
        match outcome {
            Outcome::Pass => ResponseFuture::inner(self.inner.call(request), None),
            // gRPC or not matters only for a refusal: the header is looked at only then.
            Outcome::Refuse => {
                ResponseFuture::ready(refuse(shared, None, is_grpc(request.headers())))
            }
            Outcome::Decided(Verdict::Decided(decision), quota) if decision.allowed => {
                let headers = shared
                    .headers
                    .then(|| allowed_headers(shared, quota, &decision));
                ResponseFuture::inner(self.inner.call(request), headers)
            }
            Outcome::Decided(Verdict::Decided(decision), quota) => ResponseFuture::ready(refuse(
                shared,
                Some((&decision, quota)),
                is_grpc(request.headers()),
            )),
            Outcome::Decided(Verdict::Unavailable, _) => {
                ResponseFuture::ready(unavailable(shared, is_grpc(request.headers())))
            }
            later @ Outcome::Later(..) => {
                let clone = self.inner.clone();
                let inner = mem::replace(&mut self.inner, clone);
                let shared = Arc::clone(shared);
                ResponseFuture::boxed(Box::pin(decide_then_call(
                    shared, inner, request, later, cost,
                )))
            }
        }
    }
}

async fn decide_then_call<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<ReqBody>,
    outcome: Outcome,
    cost: u64,
) -> Result<Response<ResBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody,
{
    let grpc = is_grpc(request.headers());
    let (verdict, quota) = match outcome {
        Outcome::Pass => return inner.call(request).await,
        Outcome::Refuse => return Ok(refuse(&shared, None, grpc)),
        Outcome::Decided(verdict, quota) => (verdict, quota),
        Outcome::Later(counter, quota) => {
            let check = Check::new(&counter, quota, shared.policy.algorithm(), cost);
            let verdict = match shared.limiter.decide_now(&check) {
                Some(verdict) => verdict,
                None => shared.limiter.decide(&check).await,
            };
            (verdict, quota)
        }
    };
    match verdict {
        Verdict::Decided(decision) if decision.allowed => {
            let mut response = inner.call(request).await?;
            if shared.headers {
                add_headers(&mut response, allowed_headers(&shared, quota, &decision));
            }
            Ok(response)
        }
        Verdict::Decided(decision) => Ok(refuse(&shared, Some((&decision, quota)), grpc)),
        Verdict::Unavailable => Ok(unavailable(&shared, grpc)),
    }
}

type HeaderPair = (HeaderValue, HeaderValue);

fn allowed_headers(shared: &Shared, quota: Quota, decision: &Decision) -> HeaderPair {
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

fn add_headers<B>(response: &mut Response<B>, (policy, state): HeaderPair) {
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
    /// The response future of [`RateLimit`].
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future, headers } => {
                let mut response = ready!(future.poll(cx))?;
                if let Some(headers) = headers.take() {
                    add_headers(&mut response, headers);
                }
                Poll::Ready(Ok(response))
            }
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(*response)),
                None => Poll::Ready(Ok(plain_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "polled after completion\n",
                ))),
            },
            KindProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}
