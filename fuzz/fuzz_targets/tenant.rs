//! A request's host, path or header to the tenant it names, through each resolver the crate
//! ships, then the name check the tenant layer applies.
//!
//! Properties:
//! - a subdomain found is the host's own label(s) before the base domain;
//! - a mapped host finds only a tenant it was mapped to;
//! - a path segment found follows the prefix and holds no `/`; with stripping, the rewritten
//!   path is what followed the segment, and the query is kept;
//! - a header tenant is the one value of the one header;
//! - a name the layer accepts is short, lower-case letters, digits and inner hyphens: nothing
//!   that could split or reach into another tenant's keys.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderValue, Request, Uri, header};
use libfuzzer_sys::fuzz_target;
use tower_turnstile::{
    RequestView,
    tenant::{HeaderTenant, HostMap, HostSubdomain, PathPrefix, Resolution, ResolveTenant, Tenant},
};

#[derive(Debug, Arbitrary)]
struct Input {
    /// The request target (`/path?query`, or an absolute URI with a host).
    target: String,
    /// `Host` header values.
    hosts: Vec<Vec<u8>>,
    /// `X-Tenant` header values.
    tenant_headers: Vec<Vec<u8>>,
    strip: bool,
}

fuzz_target!(|input: Input| {
    let Ok(uri) = input.target.parse::<Uri>() else {
        return;
    };
    let mut request = Request::new(());
    *request.uri_mut() = uri.clone();
    for host in &input.hosts {
        if let Ok(value) = HeaderValue::from_bytes(host) {
            request.headers_mut().append(header::HOST, value);
        }
    }
    for value in &input.tenant_headers {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            request.headers_mut().append("x-tenant", value);
        }
    }
    let view = RequestView::new(&request);
    // The host a resolver sees: the one `Host` header, else the URI's authority.
    let hosts: Vec<&HeaderValue> = request.headers().get_all(header::HOST).iter().collect();
    let host = match hosts.as_slice() {
        [one] => one.to_str().ok().map(str::to_owned),
        [] => uri
            .authority()
            .map(|authority| authority.as_str().to_owned()),
        _ => None,
    };

    let subdomain = HostSubdomain::from_static("example.com");
    if let Some(name) = found(subdomain.resolve(&view)) {
        let host = host
            .as_deref()
            .expect("a subdomain of no host")
            .to_ascii_lowercase();
        assert!(
            host.starts_with(&format!("{name}.example.com")),
            "subdomain {name:?} of host {host:?}"
        );
    }
    if let Some(name) = found(HostSubdomain::first_label().resolve(&view)) {
        let host = host.as_deref().expect("a first label of no host");
        assert!(
            host.starts_with(&format!("{name}.")),
            "first label {name:?} of host {host:?}"
        );
    }

    let map = HostMap::new()
        .with_static_host("a.example.com", "a")
        .with_static_host("10.0.0.1", "b")
        .with_static_host("[2001:db8::1]", "c");
    if let Some(name) = found(map.resolve(&view)) {
        assert!(
            ["a", "b", "c"].contains(&name.as_str()),
            "mapped to {name:?}"
        );
    }

    let path = uri.path();
    let prefix = PathPrefix::from_static("/t").with_strip_prefix(input.strip);
    match prefix.resolve(&view) {
        Resolution::Found(candidate) => {
            let name = candidate.name();
            assert!(!name.contains('/'), "segment {name:?}");
            let after = path
                .strip_prefix(&format!("/t/{name}"))
                .unwrap_or_else(|| panic!("segment {name:?} is not after /t/ in {path:?}"));
            assert!(
                after.is_empty() || after.starts_with('/'),
                "{name:?} is part of a segment"
            );
            match (input.strip, candidate.uri()) {
                (false, rewritten) => assert!(rewritten.is_none(), "rewrote without stripping"),
                (true, Some(rewritten)) => {
                    let expected = if after.is_empty() { "/" } else { after };
                    assert_eq!(rewritten.path(), expected);
                    assert_eq!(rewritten.query(), uri.query());
                }
                (true, None) => panic!("stripping found a tenant and kept the path"),
            }
            accepted(name);
        }
        Resolution::Missing(_) | Resolution::Malformed(_) => {}
        other => panic!("a resolution of another kind: {other:?}"),
    }

    let by_header = HeaderTenant::new(http::HeaderName::from_static("x-tenant"));
    if let Some(name) = found(by_header.resolve(&view)) {
        let values: Vec<_> = request.headers().get_all("x-tenant").iter().collect();
        assert_eq!(values.len(), 1, "a tenant from {} headers", values.len());
        assert_eq!(values[0].to_str().ok(), Some(name.as_str()));
    }
});

/// The name a resolution found, after checking what the layer would make of it.
fn found(resolution: Resolution) -> Option<String> {
    match resolution {
        Resolution::Found(candidate) => {
            accepted(candidate.name());
            Some(candidate.name().to_owned())
        }
        _ => None,
    }
}

/// A name the layer accepts is safe in a key, and accepting it again changes nothing.
fn accepted(name: &str) {
    let Ok(tenant) = Tenant::new(name) else {
        return;
    };
    let text = tenant.as_str();
    assert!(!text.is_empty() && text.len() <= 63, "{text:?}");
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{text:?} may reach into another key"
    );
    assert!(!text.starts_with('-') && !text.ends_with('-'), "{text:?}");
    assert_eq!(
        Tenant::new(text).as_ref(),
        Ok(&tenant),
        "accepting {text:?} again"
    );
    assert_eq!(text, name.to_ascii_lowercase());
}
