//! Logins: a random session id in a cookie; the session (role, person, CSRF token, expiry) in
//! kas's database under the id's SHA-256 digest, so it survives a restart and every replica
//! on the same database knows it. Pure parts (cookie text, parsing, the row mapping) are
//! functions; the store is the only state.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use tether_store::{Store, WebSession};

use crate::auth::AdminToken;
use crate::config::WebOidc;

/// The session cookie's name without TLS.
pub const COOKIE: &str = "tether_session";

/// The session cookie's name over TLS, where browsers take a `__Host-` cookie only from this
/// host itself, `Secure`, for `Path=/` and without `Domain`: a sibling subdomain cannot set
/// one to pin a victim to the attacker's session (login fixation).
const HOST_COOKIE: &str = "__Host-tether_session";

/// The session cookie's name on a listener with or without TLS.
pub fn cookie_name(tls: bool) -> &'static str {
    if tls { HOST_COOKIE } else { COOKIE }
}

/// Most sessions kept (the soonest-expiring viewers' dropped first): a flood of logins cannot
/// grow the table without bound.
const MAX_SESSIONS: i64 = 10_000;

/// Most sessions of one person (their soonest-expiring dropped first): one person logging in
/// in a loop pushes out their own sessions, not everyone else's. Enough for a person's
/// browsers and devices.
const MAX_SESSIONS_PER_SUBJECT: i64 = 16;

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

    fn from_name(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub role: Role,
    /// `None`: the admin-token login, which has no identity in the cluster.
    pub person: Option<Person>,
    pub csrf: String,
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

/// What the database holds for a session id: its SHA-256, hex (a copy of the database does
/// not log anyone in).
fn id_digest(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// The stored form of a new session; `admin_token` is the fingerprint of the admin token in
/// force, recorded for the admin-token login (no person).
fn row_of(id: &str, session: &Session, expires_at: i64, admin_token: &str) -> WebSession {
    let person = session.person.as_ref();
    let groups = person.map_or_else(Vec::new, |p| p.groups.clone());
    WebSession {
        id_digest: id_digest(id),
        role: session.role.name().to_owned(),
        subject: person.map(|p| p.subject.clone()),
        username: person.map(|p| p.username.clone()),
        groups: serde_json::to_string(&groups).unwrap_or_else(|_| "[]".to_owned()),
        csrf: session.csrf.clone(),
        admin_token: person.is_none().then(|| admin_token.to_owned()),
        expires_at,
    }
}

/// The session a stored row describes; `None` for a row this kas cannot read (a role it does
/// not know): no session rather than a guessed one. An admin-token login lives only as long
/// as the admin token it was opened with (`admin_token`: the fingerprint in force now). A
/// person's role is the one `roles` (`web.oidc` in force now) gives them, not the one stored
/// at login: a person no longer listed, or kas no longer configured for OpenID Connect, has
/// no session.
fn session_of(row: WebSession, admin_token: &str, roles: Option<&WebOidc>) -> Option<Session> {
    let mut role = Role::from_name(&row.role)?;
    let person = match (row.subject, row.username, row.admin_token) {
        (Some(subject), Some(username), None) => {
            let groups: Vec<String> = serde_json::from_str(&row.groups).ok()?;
            role = crate::webui::oidc::role_of(roles?, &subject, &groups)?;
            Some(Person {
                subject,
                username,
                groups,
            })
        }
        (None, None, Some(opened_with)) => {
            use subtle::ConstantTimeEq as _;
            let same = opened_with.as_bytes().ct_eq(admin_token.as_bytes());
            if !bool::from(same) {
                return None;
            }
            None
        }
        _ => return None,
    };
    Some(Session {
        role,
        person,
        csrf: row.csrf,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The web UI's sessions, in kas's store.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    store: Arc<dyn Store>,
    /// Admin-token logins end when this token is rotated.
    admin: AdminToken,
    /// `web.oidc` in force: people's roles are read from it at each request.
    roles: Option<Arc<WebOidc>>,
}

impl Sessions {
    pub fn new(
        store: Arc<dyn Store>,
        admin: AdminToken,
        ttl: Duration,
        roles: Option<WebOidc>,
    ) -> Self {
        Self {
            ttl,
            store,
            admin,
            roles: roles.map(Arc::new),
        }
    }

    /// Starts a session; returns its id (the cookie's value). Fails when the store cannot
    /// record it: no cookie for a session that would not be found.
    pub async fn create(
        &self,
        role: Role,
        person: Option<Person>,
    ) -> Result<String, tether_store::Error> {
        let id = random_token();
        let session = Session {
            role,
            person,
            csrf: random_token(),
        };
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let expires_at = unix_now().saturating_add(ttl);
        let row = row_of(&id, &session, expires_at, &self.admin.fingerprint());
        self.store
            .create_web_session(&row, MAX_SESSIONS, MAX_SESSIONS_PER_SUBJECT)
            .await?;
        Ok(id)
    }

    /// The unexpired session with this id, if any. A store that does not answer is an error,
    /// never "no session": an outage must not look like being logged out (the login page
    /// would then fail too, and the cookie would be dropped for nothing).
    pub async fn get(&self, id: &str) -> Result<Option<Session>, tether_store::Error> {
        let row = self.store.web_session(&id_digest(id)).await?;
        Ok(row.and_then(|r| session_of(r, &self.admin.fingerprint(), self.roles.as_deref())))
    }

    /// Ends the session on every replica.
    pub async fn remove(&self, id: &str) -> Result<(), tether_store::Error> {
        self.store
            .delete_web_session(&id_digest(id))
            .await
            .map(drop)
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
        "{}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        cookie_name(tls),
        max_age.as_secs()
    )
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie(tls: bool) -> String {
    set_cookie("", Duration::ZERO, tls)
}

/// The value of cookie `name` in a `Cookie` header; `None` when it is there twice: kas sets
/// one, so a second was set by someone else (another path or domain), and which of the two the
/// browser sends first is theirs to choose.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    let mut found = header.split(';').filter_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    });
    let value = found.next()?;
    found.next().is_none().then_some(value)
}

/// Whether a submitted CSRF token is the session's, compared in constant time.
pub fn csrf_matches(session: &Session, submitted: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    !submitted.is_empty() && bool::from(session.csrf.as_bytes().ct_eq(submitted.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_http_only_lax_and_secure_with_tls() {
        let c = set_cookie("abc", Duration::from_secs(60), true);
        assert_eq!(
            c,
            "__Host-tether_session=abc; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
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

    /// A second cookie of the name (set by a sibling subdomain, say, and sent first) was taken
    /// as the session: a person could be pinned to the attacker's session.
    #[test]
    fn a_cookie_sent_twice_is_no_session() {
        assert_eq!(
            cookie_value("tether_session=evil; tether_session=mine", COOKIE),
            None
        );
        assert!(clear_cookie(false).starts_with("tether_session="));
        assert!(set_cookie("x", Duration::from_secs(1), false).starts_with("tether_session=x;"));
    }

    #[tokio::test]
    async fn sessions_are_stored_by_digest_expire_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            tether_store::SqliteStore::open(&dir.path().join("kas.db"))
                .await
                .unwrap(),
        );
        let admin_file = dir.path().join("admin-token");
        std::fs::write(&admin_file, "admin\n").unwrap();
        let admin = AdminToken::load_or_create(&admin_file).unwrap();
        let s = Sessions::new(
            Arc::clone(&store),
            admin.clone(),
            Duration::from_secs(60),
            None,
        );
        let id = s.create(Role::Admin, None).await.unwrap();
        let got = s.get(&id).await.unwrap().expect("session");
        assert_eq!(got.role, Role::Admin);
        assert_eq!(got.display_name(), "admin token");
        assert!(csrf_matches(&got, &got.csrf));
        assert!(!csrf_matches(&got, ""));
        assert!(!csrf_matches(&got, "forged"));
        assert!(
            store.web_session(&id).await.unwrap().is_none(),
            "not by the id itself"
        );
        // Another kas on the same database (a restart, a replica) knows it.
        let other = Sessions::new(
            Arc::clone(&store),
            admin.clone(),
            Duration::from_secs(60),
            None,
        );
        assert_eq!(other.get(&id).await.unwrap(), Some(got));
        s.remove(&id).await.unwrap();
        assert!(other.get(&id).await.unwrap().is_none());
        let short = Sessions::new(store, admin, Duration::ZERO, None);
        let id = short.create(Role::Viewer, None).await.unwrap();
        assert!(short.get(&id).await.unwrap().is_none(), "expired at once");
    }

    #[test]
    fn a_person_and_their_role_come_back_from_the_row_and_unknown_rows_give_none() {
        let person = Person {
            subject: "sub".into(),
            username: "alice".into(),
            groups: vec!["ops".into(), "dev".into()],
        };
        let session = Session {
            role: Role::Viewer,
            person: Some(person),
            csrf: "c".into(),
        };
        let row = row_of("id", &session, 10, "print");
        assert_eq!(row.id_digest.len(), 64);
        assert_eq!(row.admin_token, None, "a person's login");
        let roles = roles(&["dev"], &[]);
        assert_eq!(
            session_of(row.clone(), "print", Some(&roles)),
            Some(session)
        );
        let unknown_role = WebSession {
            role: "owner".into(),
            ..row.clone()
        };
        assert_eq!(session_of(unknown_role, "print", Some(&roles)), None);
        let half_person = WebSession {
            subject: None,
            ..row
        };
        assert_eq!(session_of(half_person, "print", Some(&roles)), None);
        // The admin-token login lasts as long as its token.
        let admin = Session {
            role: Role::Admin,
            person: None,
            csrf: "c".into(),
        };
        let row = row_of("id2", &admin, 10, "print");
        assert_eq!(row.admin_token.as_deref(), Some("print"));
        assert_eq!(session_of(row.clone(), "print", None), Some(admin));
        assert_eq!(session_of(row, "rotated", None), None);
    }

    /// `web.oidc` listing `viewer_groups` and `admin_groups`.
    fn roles(viewer_groups: &[&str], admin_groups: &[&str]) -> WebOidc {
        let own = |g: &[&str]| g.iter().map(|s| (*s).to_owned()).collect();
        WebOidc {
            admin_subjects: Vec::new(),
            admin_groups: own(admin_groups),
            viewer_subjects: Vec::new(),
            viewer_groups: own(viewer_groups),
            ..crate::webui::oidc::tests::cfg()
        }
    }

    /// A person's role is read from `web.oidc` at each request, not kept from the login: taken
    /// off the lists (kas restarted with the new configuration), they have no session any
    /// more; moved to the admins, they are one — rather than keeping the role they logged in
    /// with for the whole `session_ttl` (8 h by default).
    #[test]
    fn a_persons_role_follows_the_configuration_in_force_not_the_login() {
        let viewer = Session {
            role: Role::Viewer,
            person: Some(Person {
                subject: "sub".into(),
                username: "alice".into(),
                groups: vec!["dev".into()],
            }),
            csrf: "c".into(),
        };
        let row = row_of("id", &viewer, 10, "print");
        let role = |cfg: Option<&WebOidc>| session_of(row.clone(), "print", cfg).map(|s| s.role);
        assert_eq!(role(Some(&roles(&["dev"], &[]))), Some(Role::Viewer));
        assert_eq!(role(Some(&roles(&[], &["dev"]))), Some(Role::Admin));
        assert_eq!(role(Some(&roles(&["ops"], &[]))), None, "taken off");
        assert_eq!(role(None), None, "OpenID Connect turned off");
        let admin_row = row_of(
            "id",
            &Session {
                role: Role::Admin,
                ..viewer
            },
            10,
            "print",
        );
        let demoted = session_of(admin_row, "print", Some(&roles(&["dev"], &[])));
        assert_eq!(demoted.map(|s| s.role), Some(Role::Viewer));
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
