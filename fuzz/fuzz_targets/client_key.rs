//! Forwarding headers (`Forwarded`, `X-Forwarded-For`) plus trusted proxies to the client
//! address the rate limiter keys on.
//!
//! Properties:
//! - with no trusted proxy, or a peer that is not trusted, the client is the peer, whatever
//!   the headers say;
//! - a client other than the peer is only ever found behind a trusted peer;
//! - when a trusted proxy appends an untrusted hop to `X-Forwarded-For` (and no `Forwarded`
//!   header is present), that hop is the client, whatever the client wrote before it;
//! - the key is the client, an IPv6 one cut to the configured prefix.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use http::{HeaderValue, Request, header};
use libfuzzer_sys::fuzz_target;
use tower_turnstile::{
    RequestView,
    ratelimit::{Client, ClientIp, KeyExtractor},
};

#[derive(Debug, Arbitrary)]
struct Input {
    peer: Address,
    /// Trusted proxies, as an operator would write them (addresses or CIDR blocks).
    trusted: Vec<String>,
    /// Headers: 0 `Forwarded`, 1 `X-Forwarded-For`, else `X-Real-IP`; the value.
    headers: Vec<(u8, Vec<u8>)>,
    /// The hop a trusted proxy appends.
    appended: Address,
    ipv6_prefix: u8,
}

#[derive(Debug, Arbitrary)]
enum Address {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Address {
    fn ip(&self) -> IpAddr {
        match *self {
            Self::V4(bytes) => IpAddr::V4(Ipv4Addr::from(bytes)),
            Self::V6(bytes) => IpAddr::V6(Ipv6Addr::from(bytes)),
        }
    }
}

fuzz_target!(|input: Input| {
    let Ok(extractor) = ClientIp::trusting(&input.trusted) else {
        return;
    };
    let prefix = input.ipv6_prefix % 129;
    let extractor = extractor
        .try_with_ipv6_prefix(prefix)
        .expect("a prefix of at most 128 bits");
    let trusted_none = ClientIp::peer();
    let peer = input.peer.ip();
    let mut request = Request::new(());
    request.extensions_mut().insert(SocketAddr::new(peer, 443));
    for (kind, value) in &input.headers {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = match kind % 3 {
            0 => header::FORWARDED,
            1 => http::HeaderName::from_static("x-forwarded-for"),
            _ => http::HeaderName::from_static("x-real-ip"),
        };
        request.headers_mut().append(name, value);
    }

    let view = RequestView::new(&request);
    let client = extractor.client(&view).expect("the request has a peer");
    assert_eq!(
        trusted_none.client(&view),
        Some(peer),
        "no proxy trusted, yet not the peer"
    );
    if input.trusted.is_empty() {
        assert_eq!(client, peer);
    }
    assert_eq!(
        extractor.client(&view),
        Some(client),
        "the same request, another client"
    );
    if !trusts(&extractor, peer) {
        assert_eq!(client, peer, "an untrusted peer's headers were believed");
    }

    // The key is the client, cut to the prefix.
    let Ok(key) = extractor.extract(&view).now() else {
        panic!("the client address is known at once");
    };
    let Some(Client::Address(keyed)) = key else {
        panic!("a request with a peer has an address key, got {key:?}");
    };
    match (client, keyed) {
        (IpAddr::V4(a), IpAddr::V4(b)) => assert_eq!(a, b),
        (IpAddr::V6(a), IpAddr::V4(b)) => assert_eq!(a.to_ipv4_mapped(), Some(b)),
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let kept = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            assert_eq!(
                a.to_bits() & kept,
                b.to_bits(),
                "{a} keyed as {b} under /{prefix}"
            );
        }
        (a, b) => panic!("{a} keyed as {b}"),
    }

    // A trusted proxy's appended hop is the client, when it is not itself trusted.
    let appended = input.appended.ip();
    let has_forwarded = request.headers().contains_key(header::FORWARDED);
    if !has_forwarded && trusts(&extractor, peer) && !trusts(&extractor, appended) {
        let mut behind = request;
        behind.headers_mut().append(
            "x-forwarded-for",
            HeaderValue::from_str(&appended.to_string()).expect("an address is a valid value"),
        );
        let found = extractor.client(&RequestView::new(&behind));
        assert_eq!(
            found,
            Some(appended),
            "a trusted proxy's hop was passed over"
        );
    }
});

/// Whether `extractor` trusts `ip`, seen from outside: a request from `ip` naming another
/// address as its client gets that address only when `ip` is trusted.
fn trusts(extractor: &ClientIp, ip: IpAddr) -> bool {
    let named = if ip == IpAddr::from([192, 0, 2, 1]) {
        "192.0.2.2"
    } else {
        "192.0.2.1"
    };
    let mut probe = Request::new(());
    probe.extensions_mut().insert(SocketAddr::new(ip, 443));
    probe
        .headers_mut()
        .append("x-forwarded-for", HeaderValue::from_static(named));
    extractor.client(&RequestView::new(&probe)) != Some(ip)
}
