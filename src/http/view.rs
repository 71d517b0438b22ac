//! What the layers' pluggable parts (tenant resolvers, rate-limit key extractors, cost
//! functions, settlements) see of a request or a response.

use http::{Extensions, HeaderMap, Method, Request, Response, StatusCode, Uri, request::Parts};
use http_body::Body;

/// A borrowed view of a request, body left out: what tenant resolvers, rate-limit key
/// extractors and cost functions decide from.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestView<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The extensions (the peer address, `Tenant`, `Session`, whatever outer layers put there).
    pub extensions: &'a Extensions,
}

impl<'a> RequestView<'a> {
    /// A view of `request`.
    pub fn new<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            extensions: request.extensions(),
        }
    }

    /// A view of the parts of a request.
    pub fn from_parts(parts: &'a Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }
}

/// A borrowed view of a response, body left out but for its size when known: what a
/// rate-limit settlement decides the request's cost from (see
/// [`Policy::with_settlement`](crate::ratelimit::Policy::with_settlement)).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ResponseView<'a> {
    /// The status.
    pub status: StatusCode,
    /// The headers (a header the inner service set, such as the tokens a call used).
    pub headers: &'a HeaderMap,
    /// The extensions.
    pub extensions: &'a Extensions,
    /// The body's exact size in bytes, when the body knows it (a full body does; a stream
    /// usually does not).
    pub body_size: Option<u64>,
}

impl<'a> ResponseView<'a> {
    /// A view of `response`.
    pub fn new<B: Body>(response: &'a Response<B>) -> Self {
        Self {
            status: response.status(),
            headers: response.headers(),
            extensions: response.extensions(),
            body_size: response.body().size_hint().exact(),
        }
    }

    /// The header `name` read as a whole number, if it is one.
    ///
    /// ```
    /// use tower_turnstile::ResponseView;
    ///
    /// let response = http::Response::builder()
    ///     .header("x-tokens-used", "1234")
    ///     .body(http_body_util::Full::<bytes::Bytes>::default())?;
    /// assert_eq!(ResponseView::new(&response).header_u64("x-tokens-used"), Some(1234));
    /// # Ok::<(), http::Error>(())
    /// ```
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        self.headers.get(name)?.to_str().ok()?.trim().parse().ok()
    }
}
