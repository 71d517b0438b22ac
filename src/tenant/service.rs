use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::Shared;
use crate::http::{RefusalBody, RequestView, is_grpc, polled_after_completion};

/// The service of a [`TenantLayer`](super::TenantLayer): puts the request's
/// [`Tenant`](super::Tenant) into its extensions, or refuses it.
#[derive(Clone)]
pub struct TenantService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for TenantService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantService")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S> TenantService<S> {
    inner_service_accessors!();

    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TenantService<S>
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
        let state = match self.shared.resolve(&RequestView::new(&request)) {
            Ok((tenant, uri)) => {
                if let Some(uri) = uri {
                    *request.uri_mut() = uri;
                }
                request.extensions_mut().insert(tenant);
                State::Inner {
                    future: self.inner.call(request),
                }
            }
            Err(rejected) => {
                let grpc = is_grpc(request.headers());
                State::Rejected {
                    response: Some(self.shared.reject(rejected, grpc)),
                }
            }
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response future of [`TenantService`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Inner { #[pin] future: F },
        Rejected { response: Option<Response<B>> },
        Done,
    }
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
        let result = match self.as_mut().project().state.project() {
            StateProj::Inner { future } => ready!(future.poll(cx)),
            StateProj::Rejected { response } => match response.take() {
                Some(response) => Ok(response),
                None => Ok(polled_after_completion()),
            },
            StateProj::Done => return Poll::Ready(Ok(polled_after_completion())),
        };
        self.project().state.set(State::Done);
        Poll::Ready(result)
    }
}
