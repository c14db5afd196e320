//! Logins: a random session id in a cookie, the session itself only in kas's memory (a
//! restart logs everyone out), each with its CSRF token and an expiry. Pure parts (cookie
//! text, parsing) are functions; the map is the only state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore as _;

/// The session cookie's name.
pub const COOKIE: &str = "tether_session";

/// Most sessions kept (oldest-expiring dropped first): a flood of logins cannot grow memory.
const MAX_SESSIONS: usize = 10_000;

/// What a logged-in person may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: actions too.
    Admin,
    /// Read-only pages.
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// A person logged in with OpenID Connect: their identity for `user_access`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// `sub`, stable at the provider.
    pub subject: String,
    /// The username impersonated in the cluster.
    pub username: String,
    pub groups: Vec<String>,
}

/// One login.
#[derive(Debug, Clone)]
pub struct Session {
    pub role: Role,
    /// `None`: the admin-token login, which has no identity in the cluster.
    pub person: Option<Person>,
    pub csrf: String,
    expires: Instant,
}

impl Session {
    /// The name shown in the page header.
    pub fn display_name(&self) -> String {
        self.person
            .as_ref()
            .map_or_else(|| "admin token".to_owned(), |p| p.username.clone())
    }
}

/// A random token of 32 bytes, hex: session ids, CSRF tokens, OIDC state and nonce, PKCE
/// verifiers.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The sessions of this kas.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::default(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a session; returns its id (the cookie's value).
    pub fn create(&self, role: Role, person: Option<Person>) -> String {
        let now = Instant::now();
        let id = random_token();
        let mut map = self.map();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        let session = Session {
            role,
            person,
            csrf: random_token(),
            expires: now + self.ttl,
        };
        map.insert(id.clone(), session);
        id
    }

    /// The unexpired session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.map();
        match map.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The `Set-Cookie` value for a session: not readable by scripts, sent on top-level
/// navigations from elsewhere but not on their POSTs (`Lax`), `Secure` when served over TLS.
pub fn set_cookie(id: &str, max_age: Duration, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        max_age.as_secs()
    )
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie(tls: bool) -> String {
    set_cookie("", Duration::ZERO, tls)
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Whether a submitted CSRF token is the session's, compared in constant time.
pub fn csrf_matches(session: &Session, submitted: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    !submitted.is_empty() && bool::from(session.csrf.as_bytes().ct_eq(submitted.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_http_only_lax_and_secure_with_tls() {
        let c = set_cookie("abc", Duration::from_secs(60), true);
        assert_eq!(
            c,
            "tether_session=abc; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
        );
        assert!(!set_cookie("abc", Duration::from_secs(60), false).contains("Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn a_cookie_is_found_among_others() {
        let h = "a=1; tether_session=xyz; b=2";
        assert_eq!(cookie_value(h, COOKIE), Some("xyz"));
        assert_eq!(cookie_value("tether_sessionx=1", COOKIE), None);
    }

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new(Duration::from_secs(60));
        let id = s.create(Role::Admin, None);
        let got = s.get(&id).expect("session");
        assert_eq!(got.role, Role::Admin);
        assert_eq!(got.display_name(), "admin token");
        assert!(csrf_matches(&got, &got.csrf));
        assert!(!csrf_matches(&got, ""));
        assert!(!csrf_matches(&got, "forged"));
        s.remove(&id);
        assert!(s.get(&id).is_none());
        let short = Sessions::new(Duration::ZERO);
        let id = short.create(Role::Viewer, None);
        assert!(short.get(&id).is_none(), "expired at once");
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
