use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{
    Session, SessionEvent,
    commit::{Committed, CookieChange},
    layer::Shared,
};
use crate::{
    http::{RefusalBody, plain_response, polled_after_completion},
    tenant::Tenant,
};

/// The service of a [`SessionLayer`](super::SessionLayer).
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S> SessionService<S> {
    inner_service_accessors!();

    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let tenant = request
            .extensions()
            .get::<Tenant>()
            .cloned()
            .unwrap_or_default();
        let incoming = self.shared.cookie.read(request.headers());
        let session = Session::new(Arc::clone(&self.shared), tenant, incoming);
        request.extensions_mut().insert(session.clone());
        ResponseFuture {
            state: State::Inner {
                future: self.inner.call(request),
                session,
            },
        }
    }
}

type CommitFuture = Pin<Box<dyn Future<Output = Committed> + Send>>;

pin_project! {
    /// The response future of [`SessionService`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Inner { #[pin] future: F, session: Session },
        Commit { commit: CommitFuture, session: Session, response: Option<Response<B>> },
        Done,
    }
}

/// What one turn of the response future's loop leads to.
enum Step<F, B, E> {
    Next(State<F, B>),
    Ready(Result<Response<B>, E>),
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: RefusalBody,
{
    type Output = Result<Response<B>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Inner { future, session } => match ready!(future.poll(cx)) {
                    Err(error) => Step::Ready(Err(error)),
                    Ok(_)
                        if session.shared().failure.refuses_any_failure()
                            && session.is_degraded() =>
                    {
                        Step::Ready(Ok(unavailable(SessionUnavailable::StoreFailed)))
                    }
                    Ok(response) if !session.needs_commit() => Step::Ready(Ok(response)),
                    Ok(response) => {
                        let server_error = response.status().is_server_error();
                        let committing = session.clone();
                        Step::Next(State::Commit {
                            commit: Box::pin(async move { committing.commit(server_error).await }),
                            session: session.clone(),
                            response: Some(response),
                        })
                    }
                },
                StateProj::Commit {
                    commit,
                    session,
                    response,
                } => {
                    let committed = ready!(commit.as_mut().poll(cx));
                    let shared = session.shared();
                    Step::Ready(Ok(match response.take() {
                        None => polled_after_completion(),
                        Some(_)
                            if shared.failure.refuses_any_failure() && session.is_degraded() =>
                        {
                            unavailable(SessionUnavailable::StoreFailed)
                        }
                        Some(_)
                            if shared.failure.refuses_lost_writes()
                                && committed.event == Some(SessionEvent::Failed) =>
                        {
                            unavailable(SessionUnavailable::WriteLost)
                        }
                        Some(response) => finish(response, committed, shared),
                    }))
                }
                StateProj::Done => Step::Ready(Ok(polled_after_completion())),
            };
            match next {
                Step::Next(state) => self.as_mut().project().state.set(state),
                // Nothing is left to do, and a poll after this one answers as such.
                Step::Ready(result) => {
                    self.as_mut().project().state.set(State::Done);
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// Put into the extensions of every `503` the session layer answers, so outer layers (logging,
/// metrics) can tell why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionUnavailable {
    /// The store failed during the request, and the layer is fail-closed
    /// ([`FailurePolicy::fail_closed`](super::FailurePolicy::fail_closed)).
    StoreFailed,
    /// The request's session changes could not be kept anywhere
    /// ([`FailurePolicy::fail_closed_on_write`](super::FailurePolicy::fail_closed_on_write)).
    WriteLost,
}

fn unavailable<B: RefusalBody>(reason: SessionUnavailable) -> Response<B> {
    let mut response = plain_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "session store unavailable\n",
    );
    response.extensions_mut().insert(reason);
    response
}

fn finish<B>(mut response: Response<B>, committed: Committed, shared: &Shared) -> Response<B> {
    if let Some(event) = committed.event {
        response.extensions_mut().insert(event);
    }
    let cookie = match committed.cookie {
        CookieChange::Keep => None,
        CookieChange::Set(id, max_age) => shared.cookie.set(&id, max_age),
        CookieChange::Remove => shared.cookie.removal(),
    };
    if let Some(cookie) = cookie {
        response
            .headers_mut()
            .append(shared.cookie.response_header(), cookie);
        // A response that sets a session cookie must never be stored by a shared cache.
        response.headers_mut().append(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
    }
    response
}
