//! gRPC answers written by the layers themselves: a trailers-only response (status and message
//! in the headers, no body), which every gRPC client reads as the call's status.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};

use super::RefusalBody;

/// Whether the request is gRPC (`content-type: application/grpc` or `application/grpc+...`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

/// A gRPC trailers-only response: status and message in the headers, no body.
pub(crate) fn grpc_status<B: RefusalBody>(code: u8, message: &'static str) -> Response<B> {
    let mut response = Response::new(B::from_bytes(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}

/// `INVALID_ARGUMENT`.
pub(crate) const GRPC_INVALID_ARGUMENT: u8 = 3;
/// `RESOURCE_EXHAUSTED`.
pub(crate) const GRPC_RESOURCE_EXHAUSTED: u8 = 8;
/// `UNAVAILABLE`.
pub(crate) const GRPC_UNAVAILABLE: u8 = 14;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_detection() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers));
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc; charset=utf-8",
        ] {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert!(is_grpc(&headers), "{ct}");
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web"),
        );
        assert!(!is_grpc(&headers), "grpc-web answers in HTTP terms");
    }
}
