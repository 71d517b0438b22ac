//! How the session id travels: in a cookie (its attributes, how it is read, signing), or in a
//! header of its own for clients that keep no cookies.

use std::{fmt, time::Duration};

use cookie::{Cookie, CookieJar, Key};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use sha2::{Digest, Sha512};

use super::id::SessionId;
use crate::ConfigError;

/// The longest cookie header value looked at; past it, the request is treated as having no
/// session cookie (browsers send at most about 4 KiB per cookie).
const MAX_COOKIE_VALUE: usize = 4096;
/// The most same-named candidate cookies tried before giving up.
const MAX_CANDIDATES: usize = 8;

/// The `SameSite` attribute of the session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SameSite {
    /// Sent only with same-site requests.
    Strict,
    /// Sent with same-site requests and top-level navigations (the default).
    #[default]
    Lax,
    /// Sent with every request; browsers require `Secure` with it.
    None,
}

/// A key that signs session cookies (HMAC-SHA256), so forged or altered ids are refused before
/// any store round trip.
///
/// Derive it from a secret every instance shares. To rotate, sign with the new key and keep the
/// old one as a previous key until the cookies it signed have expired.
#[derive(Clone)]
pub struct SigningKey(Key);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Derives a key from `secret`. Any length works, but the secret should hold at least 32
    /// random bytes: it is all that stands between an attacker and a valid signature.
    pub fn from_secret(secret: impl AsRef<[u8]>) -> Result<Self, ConfigError> {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(ConfigError::EmptySecret);
        }
        // Domain-separated so the same secret used elsewhere in an app yields another key.
        let master = Sha512::new_with_prefix(b"tower-turnstile session cookie v1\0")
            .chain_update(secret)
            .finalize();
        Ok(Self(Key::from(&master)))
    }

    /// A random key (for tests and single-instance services; cookies die with the process).
    pub fn generate() -> Self {
        Self(Key::generate())
    }
}

/// Everything about the session cookie, shared by a layer and its services.
#[derive(Debug, Clone)]
pub(crate) struct CookieConfig {
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) domain: Option<String>,
    pub(crate) secure: bool,
    pub(crate) http_only: bool,
    pub(crate) same_site: SameSite,
    pub(crate) persistent: bool,
    pub(crate) signing: Vec<SigningKey>,
    /// When set, the id travels in this request and response header instead of a cookie.
    pub(crate) header: Option<HeaderName>,
}

impl Default for CookieConfig {
    fn default() -> Self {
        Self {
            name: "id".to_owned(),
            path: "/".to_owned(),
            domain: None,
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            persistent: false,
            signing: Vec::new(),
            header: None,
        }
    }
}

/// A header the session id may travel in: a valid, lower-case name that means nothing else.
pub(crate) fn header_name(name: &str) -> Result<HeaderName, ConfigError> {
    let refused = || ConfigError::HeaderName(name.to_owned());
    let lower = name.bytes().all(|b| !b.is_ascii_uppercase());
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| refused())?;
    if !lower || parsed == header::COOKIE || parsed == header::SET_COOKIE || name.starts_with(':') {
        return Err(refused());
    }
    Ok(parsed)
}

pub(crate) fn validate_name(name: &str) -> Result<(), ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(ConfigError::CookieName(name.to_owned()));
    }
    Ok(())
}

pub(crate) fn validate_attribute(attribute: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty()
        || value
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b';' || b == b',')
    {
        return Err(ConfigError::CookieAttribute {
            attribute,
            value: value.to_owned(),
        });
    }
    Ok(())
}

impl CookieConfig {
    /// The first valid session id among the request's cookies of our name, if any. Unsigned ids
    /// must be well-formed; signed ones must also verify under the current or a previous key.
    pub(crate) fn read(&self, headers: &HeaderMap) -> Option<SessionId> {
        if let Some(name) = &self.header {
            return headers
                .get_all(name)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .filter(|value| value.len() <= MAX_COOKIE_VALUE)
                .take(MAX_CANDIDATES)
                .find_map(|value| self.decode(value.trim()));
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter(|value| value.len() <= MAX_COOKIE_VALUE)
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                (name.trim() == self.name).then(|| unquoted(value.trim()))
            })
            .take(MAX_CANDIDATES)
            .find_map(|value| self.decode(value))
    }

    fn decode(&self, value: &str) -> Option<SessionId> {
        if self.signing.is_empty() {
            return SessionId::decode(value);
        }
        let mut jar = CookieJar::new();
        jar.add_original(Cookie::new(self.name.clone(), value.to_owned()));
        self.signing.iter().find_map(|SigningKey(key)| {
            let verified = jar.signed(key).get(&self.name)?;
            SessionId::decode(verified.value())
        })
    }

    fn encode(&self, id: &SessionId) -> String {
        let Some(SigningKey(key)) = self.signing.first() else {
            return id.encode();
        };
        let mut jar = CookieJar::new();
        jar.signed_mut(key)
            .add(Cookie::new(self.name.clone(), id.encode()));
        jar.get(&self.name)
            .map(|c| c.value().to_owned())
            .unwrap_or_default()
    }

    fn base(&self, value: String) -> Cookie<'static> {
        let mut cookie = Cookie::new(self.name.clone(), value);
        cookie.set_path(self.path.clone());
        if let Some(domain) = &self.domain {
            cookie.set_domain(domain.clone());
        }
        cookie.set_secure(self.secure);
        cookie.set_http_only(self.http_only);
        cookie.set_same_site(match self.same_site {
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::None => cookie::SameSite::None,
        });
        cookie
    }

    /// The response header that carries the id: `Set-Cookie`, or the configured header.
    pub(crate) fn response_header(&self) -> HeaderName {
        self.header.clone().unwrap_or(header::SET_COOKIE)
    }

    /// The value that hands `id` to the client: a `Set-Cookie` for a persistent cookie living
    /// `max_age` or a browser-session cookie; in a header, the (signed) id alone, the client
    /// keeping it as long as it likes (the store decides when the session ends).
    pub(crate) fn set(&self, id: &SessionId, max_age: Option<Duration>) -> Option<HeaderValue> {
        if self.header.is_some() {
            return HeaderValue::try_from(self.encode(id)).ok();
        }
        let mut cookie = self.base(self.encode(id));
        if let Some(max_age) = max_age {
            // Rounded up: a cookie of a live session must never read as `Max-Age=0`, which
            // tells the browser to drop it.
            let whole = max_age.as_secs() + u64::from(max_age.subsec_nanos() > 0);
            let seconds = i64::try_from(whole.max(1)).unwrap_or(i64::MAX);
            cookie.set_max_age(cookie::time::Duration::seconds(seconds));
        }
        HeaderValue::try_from(cookie.to_string()).ok()
    }

    /// The `Set-Cookie` value that makes the client drop the cookie.
    pub(crate) fn removal(&self) -> Option<HeaderValue> {
        if self.header.is_some() {
            // An empty id: the client forgets the one it held.
            return Some(HeaderValue::from_static(""));
        }
        let mut cookie = self.base(String::new());
        cookie.make_removal();
        HeaderValue::try_from(cookie.to_string()).ok()
    }
}

/// A cookie value without the one pair of double quotes RFC 6265 allows around it; a value with
/// a quote on one side only (or more than one) is left as it is, and never decodes to an id.
fn unquoted(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for c in cookies {
            map.append(header::COOKIE, HeaderValue::from_str(c).unwrap());
        }
        map
    }

    #[test]
    fn reads_the_first_valid_candidate() {
        let config = CookieConfig::default();
        let id = SessionId::random().unwrap();
        let header = format!("other=1; id=garbage; id={}", id.encode());
        assert_eq!(config.read(&headers(&[&header])), Some(id));
    }

    #[test]
    fn only_a_pair_of_quotes_is_taken_off() {
        let config = CookieConfig::default();
        let id = SessionId::random().unwrap();
        let quoted = format!("id=\"{}\"", id.encode());
        assert_eq!(config.read(&headers(&[&quoted])), Some(id));
        for altered in [
            format!("id=\"{}", id.encode()),
            format!("id={}\"", id.encode()),
            format!("id=\"\"{}\"\"", id.encode()),
        ] {
            assert_eq!(config.read(&headers(&[&altered])), None, "{altered}");
        }
    }

    #[test]
    fn ignores_malformed_and_oversized_cookies() {
        let config = CookieConfig::default();
        let long = format!("id={}", "A".repeat(5000));
        for bad in ["id=", "id", "=;;=", "id=%00%01", long.as_str()] {
            assert_eq!(config.read(&headers(&[bad])), None, "{bad}");
        }
    }

    #[test]
    fn signed_cookies_verify_and_rotate() {
        let old = SigningKey::from_secret("old secret").unwrap();
        let new = SigningKey::from_secret("new secret").unwrap();
        let id = SessionId::random().unwrap();
        let signed_old = CookieConfig {
            signing: vec![old.clone()],
            ..Default::default()
        }
        .encode(&id);

        let rotated = CookieConfig {
            signing: vec![new.clone(), old],
            ..Default::default()
        };
        assert_eq!(
            rotated.read(&headers(&[&format!("id={signed_old}")])),
            Some(id)
        );
        assert_ne!(
            rotated.encode(&id),
            signed_old,
            "new cookies are signed with the current key"
        );

        let only_new = CookieConfig {
            signing: vec![new],
            ..Default::default()
        };
        assert_eq!(
            only_new.read(&headers(&[&format!("id={signed_old}")])),
            None
        );
        // An unsigned id is refused once signing is on.
        assert_eq!(
            only_new.read(&headers(&[&format!("id={}", id.encode())])),
            None
        );
    }

    #[test]
    fn set_and_removal_carry_the_attributes() {
        let config = CookieConfig::default();
        let id = SessionId::random().unwrap();
        let set = config.set(&id, Some(Duration::from_secs(60))).unwrap();
        let set = set.to_str().unwrap();
        for part in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/", "Max-Age=60"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        let browser = config.set(&id, None).unwrap();
        let browser = browser.to_str().unwrap();
        assert!(
            !browser.contains("Max-Age") && !browser.contains("Expires"),
            "{browser}"
        );
        let removal = config.removal().unwrap();
        assert!(removal.to_str().unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn config_validation() {
        assert!(validate_name("sid").is_ok());
        for bad in ["", "a b", "a;b", "a=b", "é"] {
            assert!(validate_name(bad).is_err());
        }
        assert!(validate_attribute("path", "/app").is_ok());
        assert!(validate_attribute("path", "/a;b").is_err());
        assert!(SigningKey::from_secret("").is_err());
    }
}
