//! Who may call what: bearer tokens by role, checked in one layer for every
//! door (gRPC, gRPC-web and the JSON gateway), before any handler runs.
//!
//! | role | may call |
//! |---|---|
//! | ingest (PRANA's browsers) | Ingest, IngestBatch, REST `ingest` |
//! | consumer (the Karma Tracker) | StreamPending, MarkProcessed(Batch), ExtendLease, REST `packets/pending`, `packets/mark-processed` |
//! | admin (operators) | everything (UserPackets, Redrive, Replay, REST `packets/user/…`, `packets/redrive`, `packets/replay`), and the consumer list in Status |
//!
//! A role without tokens is open, as before tokens existed; the startup log
//! says so. Status, health, reflection and metrics stay open. Tokens are
//! compared as SHA-256 digests in constant time, so neither a token's
//! content nor its length leaks through timing.
use std::path::Path;

use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::edge::request_id::Method;
use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Consumer,
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Consumer => "consumer",
            Role::Admin => "admin",
        }
    }
}

/// What the caller proved, for handlers that show more to some (Status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// An admin token, or no admin tokens configured at all.
    pub admin: bool,
}

type TokenDigest = [u8; 32];

/// The configured tokens of each role.
pub struct Access {
    ingest: Vec<TokenDigest>,
    consumer: Vec<TokenDigest>,
    admin: Vec<TokenDigest>,
    /// With no admin tokens, admin calls from anywhere (not only loopback).
    admin_open: bool,
}

/// Where a call comes from, as far as access goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This machine (127.0.0.0/8, ::1): where an operator without tokens sits.
    Loopback,
    Remote,
}

impl Origin {
    pub fn of(addr: Option<std::net::IpAddr>) -> Origin {
        match addr {
            Some(ip) if ip.is_loopback() => Origin::Loopback,
            Some(std::net::IpAddr::V6(v6))
                if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()) =>
            {
                Origin::Loopback
            }
            _ => Origin::Remote,
        }
    }
}

/// The roles one token holds.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    ingest: bool,
    consumer: bool,
    admin: bool,
}

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Tokens from a flag or variable, and from a file (comma- or
/// line-separated); blanks ignored. A setting that is given but holds no
/// token is refused, naming it: only a setting never given leaves the role
/// open, so an empty file or `--admin-tokens ' , '` cannot open it by
/// mistake.
fn tokens(role: Role, listed: &[String], file: Option<&Path>) -> anyhow::Result<Vec<TokenDigest>> {
    let upper = role.name().to_ascii_uppercase();
    let usable = |t: &&str| !t.trim().is_empty();
    let mut all: Vec<TokenDigest> = Vec::new();
    if !listed.is_empty() {
        let before = all.len();
        all.extend(
            listed
                .iter()
                .map(|t| t.as_str())
                .filter(usable)
                .map(|t| digest(t.trim())),
        );
        anyhow::ensure!(
            all.len() > before,
            "--{}-tokens / BUCKET_{upper}_TOKENS is set but holds no token \
             (unset it to leave the {} role open)",
            role.name(),
            role.name()
        );
    }
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("reading tokens from {}: {e}", file.display()))?;
        let before = all.len();
        all.extend(
            text.split([',', '\n'])
                .filter(usable)
                .map(|t| digest(t.trim())),
        );
        anyhow::ensure!(
            all.len() > before,
            "--{}-tokens-file / BUCKET_{upper}_TOKENS_FILE names {}, which holds no token \
             (unset it to leave the {} role open)",
            role.name(),
            file.display(),
            role.name()
        );
    }
    Ok(all)
}

/// Whether `digest` is one of `set`, looking at every member.
fn among(set: &[TokenDigest], digest: &TokenDigest) -> bool {
    let mut found = subtle::Choice::from(0);
    for member in set {
        found |= member.ct_eq(digest);
    }
    found.into()
}

impl Access {
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Access> {
        Ok(Access {
            ingest: tokens(
                Role::Ingest,
                &config.ingest_tokens,
                config.ingest_tokens_file.as_deref(),
            )?,
            consumer: tokens(
                Role::Consumer,
                &config.consumer_tokens,
                config.consumer_tokens_file.as_deref(),
            )?,
            admin: tokens(
                Role::Admin,
                &config.admin_tokens,
                config.admin_tokens_file.as_deref(),
            )?,
            admin_open: config.admin_open,
        })
    }

    /// Says, once at startup, which roles anyone may take.
    pub fn warn_open_roles(&self) {
        for (role, set) in [
            (Role::Ingest, &self.ingest),
            (Role::Consumer, &self.consumer),
            (Role::Admin, &self.admin),
        ] {
            if set.is_empty() && role == Role::Admin && !self.admin_open {
                tracing::warn!(
                    role = role.name(),
                    "no admin tokens configured: admin calls are answered only from loopback \
                     (set BUCKET_ADMIN_TOKENS, or BUCKET_ADMIN_OPEN=true to open them)"
                );
            } else if set.is_empty() {
                tracing::warn!(
                    role = role.name(),
                    "no {} tokens configured: that role is open to anyone who can reach the port",
                    role.name()
                );
            } else {
                tracing::info!(
                    role = role.name(),
                    tokens = set.len(),
                    "role protected by bearer tokens"
                );
            }
        }
    }

    fn tokens_of(&self, role: Role) -> &[TokenDigest] {
        match role {
            Role::Ingest => &self.ingest,
            Role::Consumer => &self.consumer,
            Role::Admin => &self.admin,
        }
    }

    fn held(&self, token: &str) -> Held {
        let d = digest(token);
        Held {
            ingest: among(&self.ingest, &d),
            consumer: among(&self.consumer, &d),
            admin: among(&self.admin, &d),
        }
    }

    /// The digest of the caller's token when it is one this server knows
    /// (of any role): a client the caller cannot change at will, for rate
    /// limits; None for no token or a made-up one.
    pub fn verified(&self, headers: &HeaderMap) -> Option<TokenDigest> {
        let d = digest(bearer(headers)?);
        [&self.ingest, &self.consumer, &self.admin]
            .iter()
            .any(|set| among(set, &d))
            .then_some(d)
    }

    /// Whether a call needing `required` (None: an open call) may go on
    /// with these headers from `origin`, and who the caller is.
    pub fn decide(
        &self,
        required: Option<Role>,
        headers: &HeaderMap,
        origin: Origin,
    ) -> Result<Caller, Error> {
        let token = bearer(headers);
        let held = token.map(|t| self.held(t)).unwrap_or_default();
        // Without admin tokens, the admin role is an operator's on this
        // machine, as Redis's protected mode does: a page on the internal
        // network cannot read users' packets through a browser.
        let open_admin = self.admin.is_empty() && (self.admin_open || origin == Origin::Loopback);
        let caller = Caller {
            admin: open_admin || held.admin,
        };
        let Some(required) = required else {
            return Ok(caller);
        };
        if required == Role::Admin && self.admin.is_empty() && !open_admin {
            return Err(Error::PermissionDenied(
                "admin calls need a token of BUCKET_ADMIN_TOKENS; with none set they are \
                 answered only from loopback (BUCKET_ADMIN_OPEN=true answers them from anywhere)"
                    .into(),
            ));
        }
        if self.tokens_of(required).is_empty() {
            return Ok(caller);
        }
        let Some(_) = token else {
            return Err(Error::Unauthenticated(format!(
                "this call needs a bearer token of the {} role (authorization: Bearer …)",
                required.name()
            )));
        };
        let has = match required {
            Role::Ingest => held.ingest,
            Role::Consumer => held.consumer,
            Role::Admin => false,
        };
        if held.admin || has {
            Ok(caller)
        } else if held.ingest || held.consumer {
            Err(Error::PermissionDenied(format!(
                "this token may not make calls of the {} role",
                required.name()
            )))
        } else {
            Err(Error::Unauthenticated("unknown bearer token".into()))
        }
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The role a call needs; None for open calls (Status, health, reflection,
/// metrics, unknown paths).
pub fn required_role(method: Method) -> Option<Role> {
    match method.label() {
        "Ingest" | "IngestBatch" | "rest:ingest" => Some(Role::Ingest),
        "StreamPending"
        | "Consume"
        | "MarkProcessed"
        | "MarkProcessedBatch"
        | "ExtendLease"
        | "rest:packets/pending"
        | "rest:packets/mark-processed" => Some(Role::Consumer),
        "UserPackets"
        | "Redrive"
        | "Replay"
        | "rest:packets/user"
        | "rest:packets/redrive"
        | "rest:packets/replay" => Some(Role::Admin),
        _ => None,
    }
}

/// gRPC and gRPC-web calls get gRPC statuses; everything else HTTP + JSON.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// An error answered in the caller's protocol: a trailers-only gRPC
/// response (valid for gRPC-web too), or the gateway's HTTP + JSON.
pub fn refuse(headers: &HeaderMap, error: Error) -> Response {
    if !is_grpc(headers) {
        return error.into_response();
    }
    let content_type = headers.get(header::CONTENT_TYPE).cloned();
    let mut response = tonic::Status::from(error).into_http::<axum::body::Body>();
    if let Some(ct) = content_type.filter(|ct| ct.as_bytes().starts_with(b"application/grpc-web")) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Origin = Origin::Loopback;

    fn access() -> Access {
        Access::from_config(&AuthConfig {
            ingest_tokens: vec!["browser".into()],
            consumer_tokens: vec!["karma".into(), " ".into()],
            admin_tokens: vec!["root".into()],
            ..Default::default()
        })
        .unwrap()
    }

    use axum::http::HeaderValue;

    fn with(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn roles_decide_who_may_call_what() {
        let a = access();
        let none = HeaderMap::new();
        assert!(matches!(
            a.decide(Some(Role::Ingest), &none, L),
            Err(Error::Unauthenticated(_))
        ));
        assert!(a.decide(Some(Role::Ingest), &with("browser"), L).is_ok());
        assert!(matches!(
            a.decide(Some(Role::Consumer), &with("browser"), L),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            a.decide(Some(Role::Consumer), &with("nobody"), L),
            Err(Error::Unauthenticated(_))
        ));
        assert!(a.decide(Some(Role::Consumer), &with("karma"), L).is_ok());
        assert!(matches!(
            a.decide(Some(Role::Admin), &with("karma"), L),
            Err(Error::PermissionDenied(_))
        ));
        // An admin may do everything.
        for role in [Role::Ingest, Role::Consumer, Role::Admin] {
            assert_eq!(
                a.decide(Some(role), &with("root"), L).unwrap(),
                Caller { admin: true }
            );
        }
        // Open calls go through; only admins see what admins see.
        assert_eq!(a.decide(None, &none, L).unwrap(), Caller { admin: false });
        assert_eq!(
            a.decide(None, &with("root"), L).unwrap(),
            Caller { admin: true }
        );
        // A blank token in the list is no token.
        assert!(a.decide(Some(Role::Consumer), &with(" "), L).is_err());
    }

    #[test]
    fn a_role_without_tokens_is_open() {
        let a = Access::from_config(&AuthConfig {
            ingest_tokens: vec!["browser".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(a.decide(Some(Role::Consumer), &HeaderMap::new(), L).is_ok());
        assert_eq!(
            a.decide(None, &HeaderMap::new(), L).unwrap(),
            Caller { admin: true }
        );
        assert!(a.decide(Some(Role::Ingest), &HeaderMap::new(), L).is_err());
    }

    #[test]
    fn tokens_come_from_files_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "one,two\nthree\n\n").unwrap();
        let a = Access::from_config(&AuthConfig {
            consumer_tokens_file: Some(file),
            ..Default::default()
        })
        .unwrap();
        for t in ["one", "two", "three"] {
            assert!(a.decide(Some(Role::Consumer), &with(t), L).is_ok(), "{t}");
        }
        assert!(a.decide(Some(Role::Consumer), &with("four"), L).is_err());
    }

    #[test]
    fn without_admin_tokens_admin_calls_are_answered_only_from_loopback() {
        let none = HeaderMap::new();
        let protected = Access::from_config(&AuthConfig::default()).unwrap();
        assert!(protected.decide(Some(Role::Admin), &none, L).is_ok());
        let Err(Error::PermissionDenied(why)) =
            protected.decide(Some(Role::Admin), &none, Origin::Remote)
        else {
            panic!("an admin call from afar without admin tokens")
        };
        assert!(why.contains("BUCKET_ADMIN_TOKENS"), "{why}");
        // Nor does a remote caller see what admins see.
        assert_eq!(
            protected.decide(None, &none, Origin::Remote).unwrap(),
            Caller { admin: false }
        );
        // Ingest and consumer keep their open default.
        assert!(
            protected
                .decide(Some(Role::Ingest), &none, Origin::Remote)
                .is_ok()
        );
        assert!(
            protected
                .decide(Some(Role::Consumer), &none, Origin::Remote)
                .is_ok()
        );
        let opened = Access::from_config(&AuthConfig {
            admin_open: true,
            ..Default::default()
        })
        .unwrap();
        assert!(
            opened
                .decide(Some(Role::Admin), &none, Origin::Remote)
                .is_ok()
        );
        assert_eq!(Origin::of(Some("::ffff:127.0.0.1".parse().unwrap())), L);
        assert_eq!(
            Origin::of(Some("10.0.0.7".parse().unwrap())),
            Origin::Remote
        );
        assert_eq!(Origin::of(None), Origin::Remote);
    }

    #[test]
    fn only_a_known_token_is_verified() {
        let a = access();
        assert!(a.verified(&with("browser")).is_some());
        assert!(a.verified(&with("made-up")).is_none());
        assert!(a.verified(&HeaderMap::new()).is_none());
        let mut lower = HeaderMap::new();
        lower.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer   browser"),
        );
        assert_eq!(a.verified(&lower), a.verified(&with("browser")));
    }

    #[test]
    fn a_token_setting_that_holds_no_token_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n , \n").unwrap();
        let refused = |config: AuthConfig| match Access::from_config(&config) {
            Ok(_) => panic!("started with {config:?}"),
            Err(e) => e.to_string(),
        };
        let e = refused(AuthConfig {
            admin_tokens_file: Some(empty.clone()),
            ..Default::default()
        });
        assert!(e.contains("BUCKET_ADMIN_TOKENS_FILE"), "{e}");
        let e = refused(AuthConfig {
            admin_tokens: vec![" ".into(), " ".into()],
            ..Default::default()
        });
        assert!(e.contains("BUCKET_ADMIN_TOKENS "), "{e}");
        // A blank beside real tokens is only a blank.
        let e = refused(AuthConfig {
            consumer_tokens: vec!["karma".into()],
            consumer_tokens_file: Some(empty),
            ..Default::default()
        });
        assert!(e.contains("BUCKET_CONSUMER_TOKENS_FILE"), "{e}");
        // Never given: open, as before.
        assert!(Access::from_config(&AuthConfig::default()).is_ok());
    }

    #[test]
    fn paths_map_to_roles() {
        let role = |path| required_role(Method::of(path));
        assert_eq!(role("/bucket.v1.BucketService/Ingest"), Some(Role::Ingest));
        assert_eq!(
            role("/bucket.v1.BucketService/MarkProcessedBatch"),
            Some(Role::Consumer)
        );
        assert_eq!(
            role("/bucket.v1.BucketService/Consume"),
            Some(Role::Consumer)
        );
        assert_eq!(
            role("/bucket.v1.BucketService/UserPackets"),
            Some(Role::Admin)
        );
        assert_eq!(role("/bucket.v1.BucketService/Status"), None);
        assert_eq!(role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(role("/api/v1/bucket/prana/ingest"), Some(Role::Ingest));
        assert_eq!(
            role("/api/v1/bucket/prana/packets/user/u1"),
            Some(Role::Admin)
        );
        assert_eq!(role("/api/v1/bucket/prana/status"), None);
        assert_eq!(role("/metrics"), None);
        // The gateway's user route needs a user id; without one it is no route.
        assert_eq!(role("/api/v1/bucket/prana/packets/user"), None);
        assert_eq!(role("/bucket.v1.BucketService/rest:ingest"), None);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
