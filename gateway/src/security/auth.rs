//! Who may do what on the HTTP API: rqlite's `--auth` file, HTTP Basic credentials and
//! per-route permissions.
//!
//! The file is rqlite's JSON list:
//!
//! ```json
//! [
//!   {"username": "admin", "password": "$2b$10$...bcrypt...", "perms": ["all"]},
//!   {"username": "grafana", "password": "plain text", "perms": ["query", "status"]},
//!   {"username": "*", "perms": ["status", "ready"]}
//! ]
//! ```
//!
//! A password that looks like a bcrypt hash (`$2a$`, `$2b$`, `$2x$`, `$2y$`, 60 characters) is
//! checked with bcrypt, anything else is compared as plain text in constant time. Unlike
//! rqlite, the hash itself is never accepted as the password. The `"*"` entry lists what
//! anonymous clients may do; every user may also do it.
//!
//! Decisions, in this order (rqlite's `AA`, except that wrong credentials are always refused):
//! 1. no auth file: allowed;
//! 2. a malformed `Authorization` header, an unknown user or a wrong password: **401**;
//! 3. no credentials: allowed if `"*"` has the permission, else **401**;
//! 4. a known user without the permission (in their entry or in `"*"`): **403**.
//!
//! bcrypt is slow on purpose. Measured, one verification in a release build on the 2-core
//! x86 build machine while other builds loaded it (load average ~12): cost 10 took 104-115 ms,
//! cost 12 (the `bcrypt` crate's default) 408-467 ms; a 2-core ARM board is slower still. The
//! figures come from `measure_bcrypt_and_handshakes` in `tests/security.rs`. Use cost 10 for
//! auth files (`htpasswd -nbBC 10 user pw`). So a password that verified is remembered (a keyed HMAC-SHA256 of user and password, one per user, under a
//! per-process random key): later requests with it cost one HMAC (0.3-0.7 us per request
//! measured, the whole decision included). Verifications that miss the
//! cache run on the blocking pool, one at a time, so a flood of wrong passwords takes at most
//! one core away from Raft and never blocks the async workers. An unknown user name is
//! refused without running bcrypt (so its answer is quicker: user names are not secrets here).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde::Deserialize;

pub use super::credentials::{Credentials, MalformedAuthorization};

/// rqlite's permission names, plus `devices` (device registry and downlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// Everything below.
    All,
    /// `POST /db/execute` (and, with `query`, `/db/request`).
    Execute,
    /// `GET|POST /db/query` (and, with `execute`, `/db/request`).
    Query,
    /// `POST /db/load`, `POST /boot`.
    Load,
    /// `GET /db/backup`.
    Backup,
    /// `GET /status`, `GET /nodes`, `GET /leader`, `GET /metrics`.
    Status,
    /// `GET /readyz`.
    Ready,
    /// `POST /join` as a voter (implies `join-read-only`).
    Join,
    /// `POST /join` as a non-voter.
    JoinReadOnly,
    /// `DELETE /remove`.
    Remove,
    /// `POST /snapshot`.
    Snapshot,
    /// `POST /leader` (step down, hand leadership over).
    LeaderOps,
    /// `cairn device ...`, `/devices` and downlink routes.
    Devices,
}

impl Perm {
    /// Every permission, in the order of rqlite's documentation.
    pub const EVERY: [Perm; 13] = [
        Perm::All,
        Perm::Execute,
        Perm::Query,
        Perm::Load,
        Perm::Backup,
        Perm::Status,
        Perm::Ready,
        Perm::Join,
        Perm::JoinReadOnly,
        Perm::Remove,
        Perm::Snapshot,
        Perm::LeaderOps,
        Perm::Devices,
    ];

    /// The name used in the auth file.
    pub fn name(self) -> &'static str {
        match self {
            Perm::All => "all",
            Perm::Execute => "execute",
            Perm::Query => "query",
            Perm::Load => "load",
            Perm::Backup => "backup",
            Perm::Status => "status",
            Perm::Ready => "ready",
            Perm::Join => "join",
            Perm::JoinReadOnly => "join-read-only",
            Perm::Remove => "remove",
            Perm::Snapshot => "snapshot",
            Perm::LeaderOps => "leader-ops",
            Perm::Devices => "devices",
        }
    }

    /// The permission with this auth-file name.
    pub fn from_name(name: &str) -> Option<Perm> {
        Perm::EVERY.into_iter().find(|p| p.name() == name)
    }

    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perms(u16);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const ALL: Perms = Perms(Perm::All.bit());

    /// The set with `p` added.
    pub const fn with(self, p: Perm) -> Perms {
        Perms(self.0 | p.bit())
    }

    /// Both sets together.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether the set grants `p` (`all` grants everything, `join` grants `join-read-only`).
    pub fn has(self, p: Perm) -> bool {
        let granted = |q: Perm| self.0 & q.bit() != 0;
        granted(Perm::All) || granted(p) || (p == Perm::JoinReadOnly && granted(Perm::Join))
    }
}

impl FromIterator<Perm> for Perms {
    fn from_iter<I: IntoIterator<Item = Perm>>(iter: I) -> Self {
        iter.into_iter().fold(Perms::NONE, Perms::with)
    }
}

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// This permission.
    One(Perm),
    /// Every one of these (rqlite's `/db/request` needs `query` and `execute`).
    AllOf(&'static [Perm]),
    /// Any one of these (`/join` takes `join` or `join-read-only`; the handler then checks the
    /// body's `voter` against [`Access::has`]).
    AnyOf(&'static [Perm]),
}

impl Need {
    pub fn satisfied_by(self, perms: Perms) -> bool {
        match self {
            Need::One(p) => perms.has(p),
            Need::AllOf(ps) => ps.iter().all(|p| perms.has(*p)),
            Need::AnyOf(ps) => ps.iter().any(|p| perms.has(*p)),
        }
    }
}

impl From<Perm> for Need {
    fn from(p: Perm) -> Need {
        Need::One(p)
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join =
            |ps: &[Perm], sep: &str| ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(sep);
        match self {
            Need::One(p) => f.write_str(p.name()),
            Need::AllOf(ps) => f.write_str(&join(ps, " and ")),
            Need::AnyOf(ps) => f.write_str(&join(ps, " or ")),
        }
    }
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// One entry of the auth file, as rqlite writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    username: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    perms: Vec<String>,
}

enum Secret {
    Plain(Vec<u8>),
    Bcrypt(String),
}

impl Secret {
    fn parse(password: String) -> Secret {
        let b = password.as_bytes();
        let bcrypt_like = b.len() == 60
            && b.starts_with(b"$2")
            && matches!(b[2], b'a' | b'b' | b'x' | b'y')
            && b[3] == b'$';
        if bcrypt_like {
            Secret::Bcrypt(password)
        } else {
            Secret::Plain(password.into_bytes())
        }
    }
}

struct User {
    secret: Secret,
    perms: Perms,
}

/// What an allowed request may do; handlers get it as an extractor (see [`require`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The authenticated user, `None` for anonymous requests (and when auth is off).
    pub user: Option<String>,
    pub perms: Perms,
}

impl Access {
    pub fn has(&self, p: Perm) -> bool {
        self.perms.has(p)
    }

    /// The 403 a handler answers when a body-dependent check fails (a voter join without
    /// `join`, re-pointing a member without `all`).
    pub fn forbidden(&self, need: impl Into<Need>) -> Response {
        Decision::Forbidden {
            user: self.user.clone(),
            need: need.into(),
        }
        .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Access {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Access>().cloned().ok_or_else(|| {
            // A handler asked for Access on a route the route table did not guard.
            error_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "route has no declared permission",
            )
        })
    }
}

/// The outcome of [`Authenticator::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Access),
    /// 401: no credentials where they are needed, or wrong ones.
    Unauthorized(&'static str),
    /// 403: authenticated (or anonymous) but without the permission.
    Forbidden {
        user: Option<String>,
        need: Need,
    },
}

/// rqlite's error shape: `{"results": [{"error": "..."}]}`.
pub fn error_body(status: StatusCode, msg: &str) -> Response {
    let body = serde_json::json!({"results": [{"error": msg}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for Decision {
    fn into_response(self) -> Response {
        match self {
            // Reached only when a caller turns an allowed decision into a response.
            Decision::Allow(_) => StatusCode::NO_CONTENT.into_response(),
            Decision::Unauthorized(why) => {
                let mut r = error_body(StatusCode::UNAUTHORIZED, &format!("unauthorized: {why}"));
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"cairn\""),
                );
                r
            }
            Decision::Forbidden { user, need } => {
                let who = user.map_or_else(|| "anonymous".to_string(), |u| format!("user {u}"));
                error_body(
                    StatusCode::FORBIDDEN,
                    &format!("forbidden: {who} lacks permission {need}"),
                )
            }
        }
    }
}

/// The loaded auth file (or none: everything allowed) and the cache of verified passwords.
pub struct Authenticator {
    /// `None`: no `--auth` file, every request is allowed.
    users: Option<HashMap<String, User>>,
    anonymous: Perms,
    /// Per user, the HMAC of the last password that verified against a bcrypt hash.
    verified: Mutex<HashMap<String, ring::hmac::Tag>>,
    cache_key: ring::hmac::Key,
    /// One bcrypt verification at a time (see the module doc).
    bcrypt_slot: tokio::sync::Semaphore,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.users.is_some())
            .field("users", &self.users.as_ref().map(|u| u.len()))
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Why an auth file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("reading auth file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("auth file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("auth file: user {0:?} is listed twice")]
    Duplicate(String),
    #[error("auth file: user {0:?} has no password")]
    NoPassword(String),
    #[error("auth file: user {user:?}: unknown permission {perm:?} (known: {known})")]
    UnknownPerm {
        user: String,
        perm: String,
        known: String,
    },
}

impl Authenticator {
    /// No auth file: every request is allowed (loopback-only nodes, `cairn dev`).
    pub fn disabled() -> Self {
        Self::build(None, Perms::ALL)
    }

    fn build(users: Option<HashMap<String, User>>, anonymous: Perms) -> Self {
        let rng = ring::rand::SystemRandom::new();
        Authenticator {
            users,
            anonymous,
            verified: Mutex::new(HashMap::new()),
            cache_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .expect("the system random source works"),
            bcrypt_slot: tokio::sync::Semaphore::new(1),
        }
    }

    /// Reads an rqlite auth file.
    pub fn from_file(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read(path).map_err(|err| AuthFileError::Read {
            path: path.display().to_string(),
            err,
        })?;
        Self::from_json(&text)
    }

    /// Parses the JSON of an rqlite auth file. An unknown permission name is an error: a
    /// typo would otherwise silently lock a user out of what the file meant to grant.
    pub fn from_json(json: &[u8]) -> Result<Self, AuthFileError> {
        let entries: Vec<Entry> = serde_json::from_slice(json)?;
        let mut users = HashMap::new();
        let mut anonymous = Perms::NONE;
        for e in entries {
            let mut perms = Perms::NONE;
            for name in &e.perms {
                let p = Perm::from_name(name).ok_or_else(|| AuthFileError::UnknownPerm {
                    user: e.username.clone(),
                    perm: name.clone(),
                    known: Perm::EVERY.map(Perm::name).join(", "),
                })?;
                perms = perms.with(p);
            }
            if e.username == "*" {
                anonymous = anonymous.union(perms);
                continue;
            }
            let password = e
                .password
                .ok_or_else(|| AuthFileError::NoPassword(e.username.clone()))?;
            let user = User {
                secret: Secret::parse(password),
                perms,
            };
            if users.insert(e.username.clone(), user).is_some() {
                return Err(AuthFileError::Duplicate(e.username));
            }
        }
        Ok(Self::build(Some(users), anonymous))
    }

    /// Whether an auth file is in force.
    pub fn enabled(&self) -> bool {
        self.users.is_some()
    }

    /// The password of `username` as written in the file, if it is plain text. A node's
    /// `--join-as USER` takes its password from the node's own auth file, as rqlite does; a
    /// bcrypt-hashed entry cannot be used for that.
    pub fn plain_password(&self, username: &str) -> Option<String> {
        match &self.users.as_ref()?.get(username)?.secret {
            Secret::Plain(p) => String::from_utf8(p.clone()).ok(),
            Secret::Bcrypt(_) => None,
        }
    }

    /// Decides a request from its headers; bcrypt (on a cache miss) runs on the blocking pool.
    pub async fn authorize(&self, headers: &HeaderMap, need: Need) -> Decision {
        self.decide(headers, need, |hash, password| async move {
            let _slot = self.bcrypt_slot.acquire().await.ok()?;
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .ok()
        })
        .await
    }

    /// [`Self::authorize`] for synchronous callers; bcrypt runs on this thread.
    pub fn authorize_blocking(&self, headers: &HeaderMap, need: Need) -> Decision {
        let fut = self.decide(headers, need, |hash, password| async move {
            Some(bcrypt::verify(password, &hash).unwrap_or(false))
        });
        futures_util::FutureExt::now_or_never(fut).expect("no await point without bcrypt_slot")
    }

    async fn decide<F, Fut>(&self, headers: &HeaderMap, need: Need, run_bcrypt: F) -> Decision
    where
        F: FnOnce(String, String) -> Fut,
        Fut: Future<Output = Option<bool>>,
    {
        let Some(users) = &self.users else {
            return Decision::Allow(Access {
                user: None,
                perms: Perms::ALL,
            });
        };
        let creds = match Credentials::from_headers(headers) {
            Ok(c) => c,
            Err(MalformedAuthorization) => {
                return Decision::Unauthorized("malformed Authorization header");
            }
        };
        let Some(creds) = creds else {
            return if need.satisfied_by(self.anonymous) {
                Decision::Allow(Access {
                    user: None,
                    perms: self.anonymous,
                })
            } else {
                Decision::Unauthorized("credentials required")
            };
        };
        const WRONG: &str = "invalid username or password";
        let Some(user) = users.get(&creds.username) else {
            return Decision::Unauthorized(WRONG);
        };
        let ok = match &user.secret {
            Secret::Plain(p) => constant_time_eq(p, creds.password.as_bytes()),
            Secret::Bcrypt(hash) => {
                let tag = ring::hmac::sign(&self.cache_key, &cache_input(&creds));
                let cached = self
                    .verified
                    .lock()
                    .expect("verified-password cache")
                    .get(&creds.username)
                    .is_some_and(|t| constant_time_eq(t.as_ref(), tag.as_ref()));
                if cached {
                    true
                } else if run_bcrypt(hash.clone(), creds.password.clone()).await == Some(true) {
                    self.verified
                        .lock()
                        .expect("verified-password cache")
                        .insert(creds.username.clone(), tag);
                    true
                } else {
                    false
                }
            }
        };
        if !ok {
            return Decision::Unauthorized(WRONG);
        }
        let perms = user.perms.union(self.anonymous);
        let user = Some(creds.username);
        if need.satisfied_by(perms) {
            Decision::Allow(Access { user, perms })
        } else {
            Decision::Forbidden { user, need }
        }
    }
}

/// `username NUL password`: the NUL keeps ("ab","c") and ("a","bc") apart.
fn cache_input(c: &Credentials) -> Vec<u8> {
    let mut v = Vec::with_capacity(c.username.len() + 1 + c.password.len());
    v.extend_from_slice(c.username.as_bytes());
    v.push(0);
    v.extend_from_slice(c.password.as_bytes());
    v
}

#[derive(Clone)]
struct Gate {
    auth: Arc<Authenticator>,
    need: Need,
}

async fn gate(State(g): State<Gate>, mut req: Request, next: Next) -> Response {
    match g.auth.authorize(req.headers(), g.need).await {
        Decision::Allow(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        refused => {
            tracing::debug!(path = %req.uri().path(), ?refused, "request refused");
            refused.into_response()
        }
    }
}

/// Guards one route of a route table with a permission:
///
/// ```ignore
/// Router::new()
///     .route("/db/execute", require(&auth, Perm::Execute, post(execute)))
///     .route("/db/request", require(&auth, Need::AllOf(&[Perm::Query, Perm::Execute]), post(request)))
/// ```
///
/// A refused request never reaches the handler (and its body is never read); an allowed one
/// carries its [`Access`] in the request extensions, for handlers that extract it.
pub fn require<S>(
    auth: &Arc<Authenticator>,
    need: impl Into<Need>,
    route: MethodRouter<S>,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let gate_state = Gate {
        auth: auth.clone(),
        need: need.into(),
    };
    route.route_layer(axum::middleware::from_fn_with_state(gate_state, gate))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowest bcrypt cost, so the tests stay quick; the cost does not change the logic.
    fn hashed(pw: &str) -> String {
        bcrypt::hash(pw, 4).unwrap()
    }

    fn auth() -> Authenticator {
        let json = serde_json::json!([
            {"username": "root", "password": "rootpw", "perms": ["all"]},
            {"username": "reader", "password": hashed("read:er"), "perms": ["query"]},
            {"username": "writer", "password": "w", "perms": ["execute"]},
            {"username": "joiner", "password": "j", "perms": ["join"]},
            {"username": "learner", "password": "l", "perms": ["join-read-only"]},
            {"username": "ops", "password": "o", "perms": ["devices", "leader-ops", "snapshot", "remove", "load", "backup"]},
            {"username": "*", "perms": ["status", "ready"]}
        ]);
        Authenticator::from_json(json.to_string().as_bytes()).unwrap()
    }

    fn headers(user: Option<(&str, &str)>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some((u, p)) = user {
            h.insert(
                header::AUTHORIZATION,
                Credentials::new(u, p).authorization(),
            );
        }
        h
    }

    fn decide(a: &Authenticator, user: Option<(&str, &str)>, need: impl Into<Need>) -> Decision {
        a.authorize_blocking(&headers(user), need.into())
    }

    fn allowed(d: &Decision) -> bool {
        matches!(d, Decision::Allow(_))
    }

    #[test]
    fn test_perm_names_round_trip() {
        for p in Perm::EVERY {
            assert_eq!(Perm::from_name(p.name()), Some(p));
        }
        assert_eq!(Perm::from_name("join-read-only"), Some(Perm::JoinReadOnly));
        assert_eq!(Perm::from_name("leader-ops"), Some(Perm::LeaderOps));
        assert_eq!(Perm::from_name("Query"), None);
    }

    #[test]
    fn test_all_grants_every_perm_and_join_grants_read_only() {
        for p in Perm::EVERY {
            assert!(Perms::ALL.has(p), "{p}");
        }
        let join = Perms::NONE.with(Perm::Join);
        assert!(join.has(Perm::JoinReadOnly));
        assert!(!Perms::NONE.with(Perm::JoinReadOnly).has(Perm::Join));
        assert!(!Perms::NONE.with(Perm::Query).has(Perm::Execute));
    }

    #[test]
    fn test_disabled_allows_everything_without_credentials() {
        let a = Authenticator::disabled();
        assert!(!a.enabled());
        for p in Perm::EVERY {
            assert!(allowed(&decide(&a, None, p)));
        }
        // Even garbage credentials: no auth file means no checks, as in rqlite.
        assert!(allowed(&decide(&a, Some(("x", "y")), Perm::All)));
    }

    #[test]
    fn test_anonymous_gets_star_perms_only() {
        let a = auth();
        assert!(allowed(&decide(&a, None, Perm::Status)));
        assert!(allowed(&decide(&a, None, Perm::Ready)));
        for p in Perm::EVERY
            .into_iter()
            .filter(|p| !matches!(p, Perm::Status | Perm::Ready))
        {
            assert_eq!(
                decide(&a, None, p),
                Decision::Unauthorized("credentials required"),
                "{p}"
            );
        }
    }

    #[test]
    fn test_every_route_category_by_user() {
        let a = auth();
        let request = Need::AllOf(&[Perm::Query, Perm::Execute]);
        let join = Need::AnyOf(&[Perm::Join, Perm::JoinReadOnly]);
        // (user, need, allowed?)
        let cases: &[(&str, &str, Need, bool)] = &[
            ("root", "rootpw", Perm::Execute.into(), true),
            ("root", "rootpw", request, true),
            ("root", "rootpw", Perm::Devices.into(), true),
            ("reader", "read:er", Perm::Query.into(), true),
            ("reader", "read:er", Perm::Execute.into(), false),
            ("reader", "read:er", request, false),
            ("reader", "read:er", Perm::Status.into(), true), // from "*"
            ("writer", "w", Perm::Execute.into(), true),
            ("writer", "w", Perm::Query.into(), false),
            ("writer", "w", request, false),
            ("joiner", "j", join, true),
            ("joiner", "j", Perm::Join.into(), true),
            ("learner", "l", join, true),
            ("learner", "l", Perm::Join.into(), false),
            ("ops", "o", Perm::Devices.into(), true),
            ("ops", "o", Perm::LeaderOps.into(), true),
            ("ops", "o", Perm::Snapshot.into(), true),
            ("ops", "o", Perm::Remove.into(), true),
            ("ops", "o", Perm::Load.into(), true),
            ("ops", "o", Perm::Backup.into(), true),
            ("ops", "o", Perm::Query.into(), false),
            ("ops", "o", join, false),
        ];
        for (u, p, need, ok) in cases {
            let d = decide(&a, Some((u, p)), *need);
            if *ok {
                let Decision::Allow(access) = d else {
                    panic!("{u} {need}: {d:?}")
                };
                assert_eq!(access.user.as_deref(), Some(*u));
            } else {
                assert_eq!(
                    d,
                    Decision::Forbidden {
                        user: Some(u.to_string()),
                        need: *need
                    },
                    "{u} {need}"
                );
            }
        }
    }

    #[test]
    fn test_wrong_or_unknown_credentials_are_401_even_for_open_perms() {
        let a = auth();
        let wrong = Decision::Unauthorized("invalid username or password");
        assert_eq!(decide(&a, Some(("root", "nope")), Perm::Query), wrong);
        assert_eq!(decide(&a, Some(("root", "rootpw ")), Perm::Query), wrong);
        assert_eq!(decide(&a, Some(("nobody", "x")), Perm::Query), wrong);
        assert_eq!(decide(&a, Some(("reader", "read")), Perm::Query), wrong);
        // "*" grants status, but a wrong password is still refused.
        assert_eq!(decide(&a, Some(("root", "nope")), Perm::Status), wrong);
        // The star entry is not a login.
        assert_eq!(decide(&a, Some(("*", "")), Perm::Status), wrong);
    }

    #[test]
    fn test_bcrypt_hash_is_not_a_password() {
        let h = hashed("secret");
        let json = serde_json::json!([{"username": "u", "password": h, "perms": ["all"]}]);
        let a = Authenticator::from_json(json.to_string().as_bytes()).unwrap();
        assert!(allowed(&decide(&a, Some(("u", "secret")), Perm::Query)));
        assert!(!allowed(&decide(&a, Some(("u", &h)), Perm::Query)));
        assert_eq!(a.plain_password("u"), None);
    }

    #[test]
    fn test_bcrypt_cache_remembers_only_the_verified_password() {
        let a = auth();
        assert!(a.verified.lock().unwrap().is_empty());
        assert!(allowed(&decide(
            &a,
            Some(("reader", "read:er")),
            Perm::Query
        )));
        assert_eq!(a.verified.lock().unwrap().len(), 1);
        // A cached user with a different password still goes to bcrypt and fails.
        assert!(!allowed(&decide(
            &a,
            Some(("reader", "other")),
            Perm::Query
        )));
        assert!(allowed(&decide(
            &a,
            Some(("reader", "read:er")),
            Perm::Query
        )));
        assert_eq!(a.verified.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn test_async_authorize_runs_bcrypt_off_the_runtime() {
        let a = Arc::new(auth());
        let h = headers(Some(("reader", "read:er")));
        let d = a.authorize(&h, Perm::Query.into()).await;
        assert!(allowed(&d), "{d:?}");
        let h = headers(Some(("reader", "bad")));
        assert!(!allowed(&a.authorize(&h, Perm::Query.into()).await));
    }

    #[test]
    fn test_malformed_header_is_401() {
        let a = auth();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(
            a.authorize_blocking(&h, Perm::Status.into()),
            Decision::Unauthorized("malformed Authorization header")
        );
    }

    #[test]
    fn test_auth_file_errors() {
        let bad_perm = br#"[{"username":"a","password":"b","perms":["quer"]}]"#;
        let e = Authenticator::from_json(bad_perm).unwrap_err().to_string();
        assert!(
            e.contains("\"quer\"") && e.contains("join-read-only"),
            "{e}"
        );
        let dup = br#"[{"username":"a","password":"b"},{"username":"a","password":"c"}]"#;
        assert!(matches!(
            Authenticator::from_json(dup),
            Err(AuthFileError::Duplicate(_))
        ));
        let nopw = br#"[{"username":"a","perms":["all"]}]"#;
        assert!(matches!(
            Authenticator::from_json(nopw),
            Err(AuthFileError::NoPassword(_))
        ));
        assert!(Authenticator::from_json(b"{}").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Authenticator::from_file(&dir.path().join("missing.json")),
            Err(AuthFileError::Read { .. })
        ));
        // rqlite's own example file loads.
        let rqlite = br#"[
            {"username": "bob", "password": "secret1", "perms": ["all"]},
            {"username": "mary", "password": "$2a$10$fKRHxrEuyDTP6tXIiDycr.nyC8Q7UMIfc31YMyXHDLgRDyhLK3VFS", "perms": ["query", "backup", "join"]},
            {"username": "*", "perms": ["status", "ready", "join-read-only"]}
        ]"#;
        let a = Authenticator::from_json(rqlite).unwrap();
        assert_eq!(a.plain_password("bob").as_deref(), Some("secret1"));
        assert!(allowed(&decide(&a, None, Perm::JoinReadOnly)));
    }

    #[test]
    fn test_constant_time_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[tokio::test]
    async fn test_response_bodies() {
        async fn body(r: Response) -> (StatusCode, HeaderMap, serde_json::Value) {
            let (p, b) = r.into_parts();
            let bytes = axum::body::to_bytes(b, 1 << 16).await.unwrap();
            (p.status, p.headers, serde_json::from_slice(&bytes).unwrap())
        }
        let (s, h, j) = body(Decision::Unauthorized("credentials required").into_response()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(h[header::WWW_AUTHENTICATE], "Basic realm=\"cairn\"");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            j,
            serde_json::json!({"results": [{"error": "unauthorized: credentials required"}]})
        );
        let f = Decision::Forbidden {
            user: Some("reader".into()),
            need: Need::AllOf(&[Perm::Query, Perm::Execute]),
        };
        let (s, h, j) = body(f.into_response()).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(h.get(header::WWW_AUTHENTICATE).is_none());
        assert_eq!(
            j,
            serde_json::json!({"results": [{"error": "forbidden: user reader lacks permission query and execute"}]})
        );
        let access = Access {
            user: None,
            perms: Perms::NONE.with(Perm::JoinReadOnly),
        };
        let (s, _, j) = body(access.forbidden(Perm::Join)).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(
            j["results"][0]["error"],
            "forbidden: anonymous lacks permission join"
        );
    }
}
