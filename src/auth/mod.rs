//! Access control: who the client is, and whether it may do what it asks.
//!
//! - `request.rs`: the credentials a request presents, the scopes `/token` is asked for.
//! - `htpasswd.rs`: local users (bcrypt). `token.rs`: the ES256 tokens `/token` issues and every
//!   region verifies. `rules.rs`: per-repository rules, first match wins, no match = denied.
//!   `passthrough.rs`: asking an upstream whether the client's own credentials open a repository.
//! - [`Auth::authorize`] is the one decision for a repository request (called from the route
//!   table for every pull, push and delete); [`Auth::base`] answers `/v2/`; [`Auth::grant`]
//!   (`grant.rs`) decides what a token from `/token` contains.
//!
//! Repositories are named as they are stored (`library/alpine` for Docker Hub's `alpine`,
//! `ghcr.io/org/app` for another upstream's `org/app`), whatever form the client used (`?ns=`, a
//! path prefix), so one rule covers every way of naming a repository, and tokens name them that
//! way too.

mod grant;
pub mod htpasswd;
pub mod passthrough;
pub mod request;
pub mod rules;
pub mod throttle;
pub mod token;

use std::time::Duration;

use moka::future::Cache;
use sha2::Digest as _;

use crate::config::auth::AuthConfig;
use crate::config::{Access, UpstreamConfig};
use crate::engine::registry::auth::RealmPolicy;
use crate::error::Error;
use crate::oci::RepoName;
pub use passthrough::Creds;
use passthrough::{Gate, Passthrough};
pub use request::{parse_scopes, presented, Presented};
use rules::Rules;
use token::{Claims, Keys};

/// How long a verified password is remembered (bcrypt costs tens of milliseconds, and clients
/// that send Basic credentials send them on every request).
const VERIFIED_TTL: Duration = Duration::from_secs(60);

/// Longest wait for a free bcrypt slot before the client is told to come back.
const VERIFY_WAIT: Duration = Duration::from_secs(5);

/// The outcome of a local password check.
enum Local {
    /// An htpasswd user's password.
    User(String),
    /// Not one; the reserved failure, when a verification ran, for [`Auth::settle`].
    Not(Option<throttle::Attempt>),
}

/// What a request wants to do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    /// A scope's action list (`pull,push`, `*`); unknown actions are ignored.
    pub fn parse_list(s: &str) -> Vec<Action> {
        let mut out = Vec::new();
        for a in s.split(',') {
            let more: &[Action] = match a.trim() {
                "pull" => &[Action::Pull],
                "push" => &[Action::Push],
                "delete" => &[Action::Delete],
                "*" => &[Action::Pull, Action::Push, Action::Delete],
                _ => &[],
            };
            for m in more {
                if !out.contains(m) {
                    out.push(*m);
                }
            }
        }
        out
    }
}

/// Who the rules are asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User(String),
}

/// The repository a request is about, routed.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The stored name: what rules and tokens name.
    pub repo: &'a RepoName,
    /// The upstream that owns the name (index into `upstreams`), if any.
    pub upstream: Option<usize>,
    /// The name as that upstream knows it.
    pub upstream_repo: &'a RepoName,
}

/// Why a request is refused; `http/` turns it into the response.
#[derive(Debug)]
pub enum Refusal {
    /// `401` with a Bearer challenge: credentials are missing, wrong, or (for a token) too narrow.
    Unauthorized {
        message: String,
        /// `repository:<name>:<actions>` for the challenge, when a repository is concerned.
        scope: Option<String>,
        /// RFC 6750's `error`: `invalid_token` or `insufficient_scope`.
        error: Option<&'static str>,
    },
    /// `403 DENIED`: the client is known and may not do this.
    Denied { message: String },
    /// The check itself failed (a passthrough upstream is down): nothing is served.
    Failed(Error),
    /// `429 TOOMANYREQUESTS` with `Retry-After`: too many failed passwords from this address or
    /// for this user (see `throttle.rs`), or every verification slot is busy.
    Throttled { retry_after: Duration },
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        Refusal::Failed(e)
    }
}

/// The challenge scope for `action` on `repo`. Pushes ask for pull too: uploads read blobs.
pub fn scope_for(repo: &str, action: Action) -> String {
    let actions = match action {
        Action::Pull => "pull",
        Action::Push => "pull,push",
        Action::Delete => "delete",
    };
    format!("repository:{repo}:{actions}")
}

/// What `/token` hands out.
#[derive(Debug)]
pub struct Grant {
    pub token: String,
    pub expires_in: Duration,
    /// The granted scopes, space-separated (OAuth2's `scope`).
    pub scope: String,
}

/// The access-control state built from `auth:`.
#[derive(Debug)]
pub struct Auth {
    htpasswd: Option<htpasswd::Htpasswd>,
    keys: Keys,
    rules: Rules,
    passthrough: Passthrough,
    /// By upstream index: `Some` for a passthrough upstream.
    gates: Vec<Option<Gate>>,
    /// Salted hashes of verified (user, password) pairs, with the user name.
    verified: Cache<[u8; 32], String>,
    salt: [u8; 32],
    /// Failed passwords per client address and per user.
    throttle: throttle::Throttle,
    /// bcrypt verifications at once: at most half the cores, so logins never starve the rest.
    verify_slots: tokio::sync::Semaphore,
}

impl Auth {
    /// Loads keys and the htpasswd file; errors name the setting.
    pub fn new(
        cfg: &AuthConfig,
        upstreams: &[UpstreamConfig],
        http: reqwest::Client,
    ) -> Result<Auth, String> {
        let htpasswd = match &cfg.htpasswd {
            Some(p) => {
                Some(htpasswd::Htpasswd::open(p).map_err(|e| format!("auth.htpasswd: {e}"))?)
            }
            None => None,
        };
        let mut gates = Vec::with_capacity(upstreams.len());
        for (i, u) in upstreams.iter().enumerate() {
            gates.push(match u.access {
                Some(Access::Passthrough) => Some(Gate {
                    name: u.name.clone(),
                    base: url::Url::parse(&u.url)
                        .map_err(|e| format!("upstreams[{i}].url: {e}"))?,
                    realms: RealmPolicy::of(u)
                        .ok_or_else(|| format!("upstreams[{i}].url: not a URL"))?,
                }),
                _ => None,
            });
        }
        Ok(Auth {
            htpasswd,
            keys: Keys::load(&cfg.token)?,
            rules: Rules::new(&cfg.rules)?,
            passthrough: Passthrough::new(http),
            gates,
            verified: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                .build(),
            salt: rand::random(),
            throttle: throttle::Throttle::default(),
            verify_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            ),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn gate(&self, t: &Target<'_>, action: Action) -> Option<&Gate> {
        if action != Action::Pull {
            return None;
        }
        t.upstream
            .and_then(|i| self.gates.get(i))
            .and_then(Option::as_ref)
    }

    /// The htpasswd user these credentials prove, if any. Credentials verified in the last
    /// [`VERIFIED_TTL`] are answered from memory; others cost a bcrypt verification, unless
    /// their address or user has failed too often (then `Throttled`, with no verification).
    /// A failed check is counted once the caller knows whether an upstream vouches for the
    /// credentials instead ([`Auth::settle`]).
    async fn local_user(&self, c: &Creds) -> Result<Local, Refusal> {
        let Some(ht) = self.htpasswd.as_ref() else {
            // No local users: an upstream judges the password, and a guess still counts.
            let attempt = self
                .throttle
                .begin(c.from, &c.user)
                .map_err(|w| throttled(c, w))?;
            return Ok(Local::Not(Some(attempt)));
        };
        let mut h = sha2::Sha256::new();
        h.update(self.salt);
        h.update(c.user.as_bytes());
        h.update([0]);
        h.update(c.password.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        if let Some(u) = self.verified.get(&key).await {
            return Ok(Local::User(u));
        }
        let attempt = self
            .throttle
            .begin(c.from, &c.user)
            .map_err(|w| throttled(c, w))?;
        let slot = match tokio::time::timeout(VERIFY_WAIT, self.verify_slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                self.throttle.ended(attempt, &c.user, true);
                return Err(throttled(c, Duration::from_secs(1)));
            }
        };
        let (ok, changed) = ht.verify(&c.user, &c.password).await;
        drop(slot);
        if changed {
            // A removed user or a changed password must not live on in the cache.
            self.verified.invalidate_all();
        }
        if !ok {
            tracing::debug!(user = %c.user, from = ?c.from, "not a local user's password");
            return Ok(Local::Not(Some(attempt)));
        }
        self.throttle.ended(attempt, &c.user, true);
        self.verified.insert(key, c.user.clone()).await;
        Ok(Local::User(c.user.clone()))
    }

    /// Ends a failed local check: counted as a failed password unless `vouched` (an upstream
    /// accepted the credentials, or could not be asked).
    fn settle(&self, failed: Option<throttle::Attempt>, c: &Creds, vouched: bool) {
        if let Some(a) = failed {
            self.throttle.ended(a, &c.user, vouched);
        }
    }

    /// Whether a passthrough upstream vouches for these credentials.
    async fn upstream_login(&self, c: &Creds) -> Result<bool, Error> {
        for g in self.gates.iter().flatten() {
            if self.passthrough.login(g, c).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The one access decision for a repository request.
    pub async fn authorize(
        &self,
        p: &Presented,
        t: &Target<'_>,
        action: Action,
    ) -> Result<(), Refusal> {
        let repo = t.repo.as_str();
        let gate = self.gate(t, action);
        let challenge = |message: &str, error: Option<&'static str>| Refusal::Unauthorized {
            message: message.to_string(),
            scope: Some(scope_for(repo, action)),
            error,
        };
        let denied = |who: &str| Refusal::Denied {
            message: format!("{who} may not {} {repo}", action.as_str()),
        };
        match p {
            Presented::Malformed => Err(challenge("unreadable Authorization header", None)),
            Presented::None => {
                let open = self.rules.allows(repo, action, &Principal::Anonymous)
                    && match gate {
                        Some(g) => self.passthrough.opens(g, t.upstream_repo, None).await?,
                        None => true,
                    };
                if open {
                    Ok(())
                } else {
                    Err(challenge("authentication required", None))
                }
            }
            Presented::Basic(c) => {
                if let Some(g) = gate {
                    // The upstream is the judge of these credentials, and of the repository;
                    // its "no" counts as a failed password here (a guess through ociedge must
                    // not be faster than one at the upstream, nor get ociedge locked out there).
                    let attempt = if self.passthrough.known_to_open(g, t.upstream_repo, c) {
                        None
                    } else {
                        Some(
                            self.throttle
                                .begin(c.from, &c.user)
                                .map_err(|w| throttled(c, w))?,
                        )
                    };
                    let opens = self.passthrough.opens(g, t.upstream_repo, Some(c)).await;
                    self.settle(attempt, c, !matches!(opens, Ok(false)));
                    if !opens? {
                        return Err(challenge(
                            "the upstream registry does not open this repository to these credentials",
                            None,
                        ));
                    }
                    let who = Principal::User(c.user.clone());
                    return if self.rules.allows(repo, action, &who) {
                        Ok(())
                    } else {
                        Err(denied(&c.user))
                    };
                }
                let user = match self.local_user(c).await? {
                    Local::User(u) => u,
                    Local::Not(failed) => {
                        self.settle(failed, c, false);
                        return Err(challenge("invalid username or password", None));
                    }
                };
                if self
                    .rules
                    .allows(repo, action, &Principal::User(user.clone()))
                {
                    Ok(())
                } else {
                    Err(denied(&user))
                }
            }
            Presented::Bearer(tok) => {
                let claims = self.keys.verify(tok).map_err(|e| {
                    challenge(&format!("invalid token: {e}"), Some("invalid_token"))
                })?;
                if claims.grants(repo, action.as_str()) {
                    return Ok(());
                }
                // Too narrow a token: a client that could get a wider one is told to fetch it
                // (401 insufficient_scope); one the rules refuse is told so (403).
                let could = match local_principal(&claims) {
                    Principal::Anonymous if claims.sub.is_empty() => true,
                    who => gate.is_some() || self.rules.allows(repo, action, &who),
                };
                if could {
                    Err(challenge(
                        "the token does not grant this",
                        Some("insufficient_scope"),
                    ))
                } else {
                    Err(denied(&claims.sub))
                }
            }
        }
    }

    /// `/v2/`: fine for a client whose credentials are good and may do something somewhere,
    /// else a challenge. An anonymous client is always challenged, even where anonymous pulls
    /// are allowed, as Distribution and Docker Hub answer: clients learn the token realm from
    /// this answer only, so a `200` here would keep them from ever sending their credentials.
    /// (They then fetch an anonymous token, which opens what anonymous clients may do.)
    pub async fn base(&self, p: &Presented) -> Result<(), Refusal> {
        let challenge = |message: &str, error| Refusal::Unauthorized {
            message: message.to_string(),
            scope: None,
            error,
        };
        match p {
            Presented::Malformed => Err(challenge("unreadable Authorization header", None)),
            Presented::None => Err(challenge("authentication required", None)),
            Presented::Basic(c) => {
                let failed = match self.local_user(c).await? {
                    Local::User(u) => {
                        if self.rules.grants_anything(&Principal::User(u)) {
                            return Ok(());
                        }
                        return Err(challenge("this user may not do anything here", None));
                    }
                    Local::Not(failed) => failed,
                };
                let vouched = self.upstream_login(c).await;
                // An upstream that cannot answer proves nothing against the password.
                self.settle(failed, c, !matches!(vouched, Ok(false)));
                if vouched? {
                    return Ok(());
                }
                Err(challenge("invalid username or password", None))
            }
            Presented::Bearer(t) => match self.keys.verify(t) {
                Ok(_) => Ok(()),
                Err(e) => Err(challenge(
                    &format!("invalid token: {e}"),
                    Some("invalid_token"),
                )),
            },
        }
    }
}

/// The refusal of a throttled login attempt.
fn throttled(c: &Creds, retry_after: Duration) -> Refusal {
    tracing::debug!(user = %c.user, from = ?c.from, "login attempt throttled");
    Refusal::Throttled { retry_after }
}

/// The principal a token's subject is for our own rules: only htpasswd users count; a user only
/// an upstream vouched for is anonymous to them.
fn local_principal(c: &Claims) -> Principal {
    if !c.sub.is_empty() && c.idp.as_deref() == Some("htpasswd") {
        Principal::User(c.sub.clone())
    } else {
        Principal::Anonymous
    }
}
