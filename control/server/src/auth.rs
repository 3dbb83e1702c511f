//! API authentication: a bearer token is accepted when it equals the configured admin
//! token (compared in constant time) or when its SHA-256 is stored in the `tokens` table.
//! A stored token has a role ([`TokenRole`]) that decides which routes it may call.
//! With neither an admin token configured nor an admin token stored, the first start
//! generates one and shows it once.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use esper_common::ApiError;
use esper_common::http::token_matches;
use sha2::{Digest, Sha256};

use crate::state::AppState;
use crate::store::{ControlStore, StoreError, TokenRole};

/// Who made an authenticated request: the stored token's name, or `admin` for the
/// configured admin token. Handlers record it in policy history and the decision log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The name under which the generated first token is stored.
pub const INITIAL_TOKEN_NAME: &str = "initial";

/// The caller name of the configured admin token.
pub const ADMIN_CALLER: &str = "admin";

/// What the service role may call: the routes proxies, workers, the mitigation broker's
/// decision log and apps using analyze call, and nothing an operator does.
const SERVICE_CALLS: [(Method, &str); 11] = [
    (Method::GET, "/api/v1/proxies/config"),
    (Method::GET, "/api/v1/proxies/reported"),
    (Method::GET, "/api/v1/proxies/challenge-key"),
    (Method::POST, "/api/v1/proxies/heartbeat"),
    (Method::GET, "/api/v1/policies/active"),
    (Method::POST, "/api/v1/workers/heartbeat"),
    (Method::GET, "/api/v1/decisions"),
    (Method::POST, "/api/v1/decisions"),
    (Method::POST, "/api/v1/decisions/revoke"),
    (Method::GET, "/api/v1/decisions/revocations"),
    (Method::POST, "/api/v1/analyze"),
];

/// Reads the read role may not make: a secret, or who holds access. The proxy
/// configuration may set any of a proxy's options, `challenge_secret` and the broker
/// token among them.
const SECRET_READS: [&str; 4] = [
    "/api/v1/proxies/challenge-key",
    "/api/v1/proxies/config",
    "/api/v1/tokens",
    "/api/v1/tokens/{name}",
];

/// Whether a token with `role` may call `method` on `route`, the router's template
/// (`/api/v1/policies/{id}`).
pub fn allows(role: TokenRole, method: &Method, route: &str) -> bool {
    // The router answers HEAD with the GET handler.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    match role {
        TokenRole::Admin => true,
        TokenRole::Read => {
            (method == Method::GET && !SECRET_READS.contains(&route))
                || (method == Method::POST && route == "/api/v1/policies/validate")
        }
        TokenRole::Service => SERVICE_CALLS
            .iter()
            .any(|(m, r)| m == method && *r == route),
    }
}

/// Whether `name` may be given to a new token: the names callers are recorded under in
/// policy history and the decision log must stay unambiguous.
pub fn check_token_name(name: &str) -> Result<(), String> {
    let fine = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !fine {
        return Err(format!(
            "token name `{}` must be 1 to 64 letters, digits, `.`, `_` or `-`, starting with \
             a letter or digit",
            name.chars().take(64).collect::<String>()
        ));
    }
    if name == ADMIN_CALLER || name == INITIAL_TOKEN_NAME {
        return Err(format!(
            "token name `{name}` is reserved (the configured admin token and the generated \
             first token are recorded under it)"
        ));
    }
    Ok(())
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (192 bits).
pub fn generate_token() -> String {
    format!("esper_{}", hex::encode(rand::random::<[u8; 24]>()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Middleware for `/api/v1/*`: 401 without a known token, 403 when its role may not
/// make this call.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let admin = state.admin_token.load_full();
    let found = match admin.as_deref() {
        Some(admin) if token_matches(req.headers(), admin) => {
            Some((ADMIN_CALLER.to_string(), TokenRole::Admin))
        }
        _ => match bearer(req.headers()) {
            None => None,
            Some(t) => match state.store.find_token(&hash_token(t)).await {
                Ok(found) => found,
                Err(e) => {
                    state.metrics.store_errors.inc();
                    tracing::error!(error = %e, "cannot check a token against the store");
                    return ApiError::Unavailable {
                        code: "store_unavailable",
                        message: "the control store is not reachable; try again".into(),
                        retry_after: Some(1),
                    }
                    .into_response();
                }
            },
        },
    };
    let Some((name, role)) = found else {
        return ApiError::Unauthorized.into_response();
    };
    if name != ADMIN_CALLER {
        note_use(&state, &name);
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path(), MatchedPath::as_str);
    if !allows(role, req.method(), route) {
        return ApiError::Forbidden {
            code: "forbidden",
            message: format!(
                "token `{name}` has the {role} role, which may not call {} {route}",
                req.method()
            ),
        }
        .into_response();
    }
    req.extensions_mut().insert(Caller(name));
    next.run(req).await
}

/// How often a stored token's use is written to the store, at most.
const USE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Records a stored token's use (for `tokens list`), at most once a minute and off the
/// request's path: a failed write costs the request nothing.
fn note_use(state: &AppState, name: &str) {
    let now = std::time::Instant::now();
    {
        let mut uses = state.token_uses.lock();
        if uses
            .get(name)
            .is_some_and(|last| now.duration_since(*last) < USE_EVERY)
        {
            return;
        }
        uses.insert(name.to_string(), now);
    }
    let (store, name) = (state.store.clone(), name.to_string());
    tokio::spawn(async move {
        if let Err(e) = store.token_used(&name, chrono::Utc::now()).await {
            tracing::debug!(token = %name, error = %e, "cannot record a token's use");
        }
    });
}

/// Makes sure some admin token can reach the API. Returns the token generated now, if
/// one was.
pub async fn ensure_token(
    store: &dyn ControlStore,
    admin_token: Option<&str>,
) -> Result<Option<String>, StoreError> {
    if admin_token.is_some() || store.admin_token_count().await? > 0 {
        return Ok(None);
    }
    let token = generate_token();
    // Two instances starting on one empty store both count none: one stores its token,
    // and the other starts with it (whose value that instance printed). The name is
    // reserved, so no other kind of token can hold it.
    if store
        .add_token(
            INITIAL_TOKEN_NAME,
            TokenRole::Admin,
            &hash_token(&token),
            "",
        )
        .await?
        .is_none()
    {
        tracing::info!(
            "another control-plane instance generated the initial API token; it printed it"
        );
        return Ok(None);
    }
    tracing::warn!(
        token = %token,
        "no admin API token was configured or stored, so one was generated; it is shown \
         this once: keep it (ESPER_TOKEN for esperctl)"
    );
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_stably_and_are_random() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert!(a.starts_with("esper_") && a.len() == 6 + 48);
    }

    #[test]
    fn roles_allow_what_they_are_for() {
        use TokenRole::*;
        let get = Method::GET;
        let post = Method::POST;
        let cases = [
            (Read, &get, "/api/v1/policies/{id}", true),
            (Read, &Method::HEAD, "/api/v1/status", true),
            (Read, &post, "/api/v1/policies/validate", true),
            (Read, &post, "/api/v1/policies", false),
            (Read, &Method::DELETE, "/api/v1/lists/{name}", false),
            (Read, &get, "/api/v1/proxies/challenge-key", false),
            (Read, &get, "/api/v1/tokens", false),
            (Read, &get, "/api/v1/proxies/config", false),
            (Read, &post, "/api/v1/analyze", false),
            (Service, &get, "/api/v1/proxies/config", true),
            (Service, &get, "/api/v1/proxies/challenge-key", true),
            (Service, &get, "/api/v1/proxies/reported", true),
            (Read, &get, "/api/v1/proxies/reported", true),
            (Service, &post, "/api/v1/decisions", true),
            (Service, &post, "/api/v1/analyze", true),
            (Service, &Method::PUT, "/api/v1/proxies/config", false),
            (Service, &get, "/api/v1/status", false),
            (Service, &post, "/api/v1/mitigations/revoke", false),
            (Service, &post, "/api/v1/admin/shutdown", false),
            (Admin, &post, "/api/v1/admin/shutdown", true),
            (Admin, &Method::DELETE, "/api/v1/tokens/{name}", true),
        ];
        for (role, method, route, want) in cases {
            assert_eq!(allows(role, method, route), want, "{role} {method} {route}");
        }
    }

    #[test]
    fn token_names_are_checked() {
        assert!(check_token_name("ci-deploy.v2_edge").is_ok());
        for bad in [
            "",
            "-x",
            "has space",
            "é",
            &"a".repeat(65),
            "admin",
            "initial",
        ] {
            assert!(check_token_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_token_name("admin").unwrap_err().contains("reserved"));
    }
}
