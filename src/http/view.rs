//! What the layers' pluggable parts (tenant resolvers, rate-limit key extractors, cost
//! functions) see of a request.

use http::{Extensions, HeaderMap, Method, Request, Uri, request::Parts};

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
