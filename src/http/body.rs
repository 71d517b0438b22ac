//! The response bodies the layers write their own answers in.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{
    BodyExt, Full,
    combinators::{BoxBody, UnsyncBoxBody},
};
use pin_project_lite::pin_project;

/// A response body type the layers can write their own answers in: the rate limiter's `429`,
/// the tenant layer's `400`, a fail-closed store's `503`.
///
/// A layer's service answers with the inner service's own body type, untouched on the way
/// through (no wrapper, no second boxing by axum); for its own answers it builds that type
/// from bytes with this trait. It is implemented for axum's `Body` (feature `axum`), tonic's
/// `Body` (feature `tonic`),
/// [`Full<Bytes>`], [`BoxBody<Bytes, E>`], [`UnsyncBoxBody<Bytes, E>`], `String`, and
/// [`ResponseBody<B>`], which wraps any other body.
///
/// A service with a body type of its own either implements this trait for it or has its
/// responses wrapped in [`ResponseBody`] under the layer:
///
/// ```
/// use http::{Request, Response};
/// use http_body_util::Empty;
/// use bytes::Bytes;
/// use tower::{ServiceBuilder, service_fn};
/// use tower_turnstile::{
///     ResponseBody,
///     ratelimit::{Policy, Quota, RateLimitLayer},
/// };
///
/// // `Empty` cannot hold the text of a refusal: wrap it.
/// let service = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(Policy::new("per-ip", Quota::per_minute(100))?))
///     .map_response(|response: Response<Empty<Bytes>>| response.map(ResponseBody::new))
///     .service(service_fn(|_: Request<()>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
///     }));
/// # let _ = service;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait RefusalBody: Sized {
    /// A body holding `bytes` (none at all when they are empty).
    fn from_bytes(bytes: Bytes) -> Self;
}

impl RefusalBody for Full<Bytes> {
    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes)
    }
}

impl<E: 'static> RefusalBody for BoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes)
            .map_err(|never: Infallible| match never {})
            .boxed()
    }
}

impl<E: 'static> RefusalBody for UnsyncBoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes)
            .map_err(|never: Infallible| match never {})
            .boxed_unsync()
    }
}

/// tonic's body: the layers' gRPC refusals are trailers-only, so this holds no message.
#[cfg(feature = "tonic")]
impl RefusalBody for tonic::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        tonic::body::Body::new(Full::new(bytes))
    }
}

impl RefusalBody for String {
    fn from_bytes(bytes: Bytes) -> Self {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(feature = "axum")]
impl RefusalBody for axum::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        axum::body::Body::from(bytes)
    }
}

impl<B> RefusalBody for ResponseBody<B> {
    fn from_bytes(bytes: Bytes) -> Self {
        Self::local(bytes)
    }
}

pin_project! {
    /// A response body that is either an inner service's body, untouched, or a short body a
    /// layer wrote itself: the [`RefusalBody`] for body types that have none of their own.
    ///
    /// A wrapped body forwards its frames, size hint and trailers as they are.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Local { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn new(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body a layer wrote itself.
    fn local(data: Bytes) -> Self {
        Self {
            kind: Kind::Local {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// What every layer's response future answers when it is polled again after it completed (a
/// caller's mistake): a plain `500`, without touching the inner service's future again.
pub(crate) fn polled_after_completion<B: RefusalBody>() -> http::Response<B> {
    plain_response(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "response future polled after completion\n",
    )
}

/// A plain-text response written by a layer.
pub(crate) fn plain_response<B: RefusalBody>(
    status: http::StatusCode,
    text: &'static str,
) -> http::Response<B> {
    let mut response = http::Response::new(B::from_bytes(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn text<B>(body: B) -> String
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let bytes = body.collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    const REFUSAL: &str = "rate limit exceeded\n";

    #[tokio::test]
    async fn every_refusal_body_carries_the_bytes() {
        let bytes = || Bytes::from_static(REFUSAL.as_bytes());
        assert_eq!(text(Full::from_bytes(bytes())).await, REFUSAL);
        assert_eq!(
            text(BoxBody::<Bytes, std::io::Error>::from_bytes(bytes())).await,
            REFUSAL
        );
        assert_eq!(
            text(UnsyncBoxBody::<Bytes, std::io::Error>::from_bytes(bytes())).await,
            REFUSAL
        );
        assert_eq!(String::from_bytes(bytes()), REFUSAL);
        #[cfg(feature = "axum")]
        assert_eq!(text(axum::body::Body::from_bytes(bytes())).await, REFUSAL);
        let wrapped = ResponseBody::<Full<Bytes>>::from_bytes(bytes());
        assert_eq!(wrapped.size_hint().exact(), Some(REFUSAL.len() as u64));
        assert_eq!(text(wrapped).await, REFUSAL);
    }

    #[tokio::test]
    async fn an_empty_refusal_is_an_ended_body_and_a_wrapped_body_passes_through() {
        let empty = ResponseBody::<Full<Bytes>>::from_bytes(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(
            String::from_bytes(Bytes::from_static(b"\xffok")),
            "\u{fffd}ok"
        );
        let inner = ResponseBody::new(Full::new(Bytes::from_static(b"inner")));
        assert_eq!(inner.size_hint().exact(), Some(5));
        assert_eq!(text(inner).await, "inner");
    }
}
