//! Who may use the endpoint. Live state (`/state/…`) is the job's data, so it never carries a
//! permissive CORS header: a web page on another origin cannot read it through a browser that can reach
//! the endpoint. Beyond that, two optional guards:
//!
//! - a **bearer token** ([`HttpAccess::with_token`], `--http-token` / `HTTP_TOKEN` /
//!   `--http-token-file`): every path but `/health` and `/ready` answers `401` without
//!   `Authorization: Bearer TOKEN` (a browser may send it as the password of HTTP Basic, so the
//!   dashboard opens after a login prompt); members send it when they forward a state query; with a
//!   token no answer carries `Access-Control-Allow-Origin` at all;
//! - a **`Host` allow-list** ([`HttpAccess::with_allowed_hosts`], `--http-allowed-host`): a request
//!   naming any other host gets `403`, which defeats DNS rebinding (a page on `evil.example` whose name
//!   was re-pointed at the endpoint's address still sends `Host: evil.example`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::error::{ProcessorError, ProcessorResult};

/// The shortest token accepted: 128 bits as hex is 32 characters; 16 is the floor for anything typed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who may use the endpoint (see the [module](self)). The default is open: no token, any `Host`.
#[derive(Clone, Default)]
pub struct HttpAccess {
    token: Option<Arc<str>>,
    allowed_hosts: Arc<[String]>,
    /// The client that forwards state queries, when a CA of its own was given (else the shared one
    /// with the platform's roots).
    forwarding: Option<super::state_queries::ForwardingClient>,
}

impl std::fmt::Debug for HttpAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAccess")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("forwarding_ca", &self.forwarding.is_some())
            .finish()
    }
}

impl HttpAccess {
    /// Requires `Authorization: Bearer {token}` on every path but `/health` and `/ready`.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] (`http token`) for a token shorter than [`MIN_TOKEN_LEN`] or
    /// with characters outside visible ASCII (its value is never shown).
    pub fn with_token(mut self, token: &str) -> ProcessorResult<Self> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ProcessorError::InvalidInput {
                what: "http token",
                reason: format!(
                    "a token of {} characters: use at least {MIN_TOKEN_LEN} visible ASCII characters without spaces (e.g. `openssl rand -hex 16`)",
                    token.chars().count()
                ),
            });
        }
        self.token = Some(Arc::from(token));
        Ok(self)
    }

    /// Answers only requests whose `Host` (without its port) is one of `hosts` (`localhost`,
    /// `processor-1.internal`, `10.0.0.7`); any other gets `403`.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] (`http allowed host`) for an empty name or one with a scheme,
    /// path or port.
    pub fn with_allowed_hosts<'a>(
        mut self,
        hosts: impl IntoIterator<Item = &'a str>,
    ) -> ProcessorResult<Self> {
        let mut allowed: Vec<String> = self.allowed_hosts.to_vec();
        for host in hosts {
            let host = host.trim();
            if host.is_empty() || host.contains(['/', ' ']) || host_without_port(host) != host {
                return Err(ProcessorError::InvalidInput {
                    what: "http allowed host",
                    reason: format!(
                        "`{host}` is not a host name: give the name alone, without scheme, port or path"
                    ),
                });
            }
            allowed.push(host.to_ascii_lowercase());
        }
        self.allowed_hosts = allowed.into();
        Ok(self)
    }

    /// Trusts the CA certificates in the PEM file `ca` (besides the platform's roots) when a member
    /// forwards a state query to another member's `https://` endpoint (`--http-ca-file`): members whose
    /// certificates a private CA signed.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] (`http ca file`) naming the file when it cannot be read or holds
    /// no certificate.
    pub fn with_forwarding_ca(mut self, ca: &std::path::Path) -> ProcessorResult<Self> {
        self.forwarding = Some(super::state_queries::forwarding_client_with(Some(ca))?);
        Ok(self)
    }

    /// The token members send when they forward a query.
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The client that forwards state queries.
    pub(crate) fn forwarding_client(
        &self,
    ) -> ProcessorResult<super::state_queries::ForwardingClient> {
        match &self.forwarding {
            Some(client) => Ok(client.clone()),
            None => super::state_queries::shared_forwarding_client(),
        }
    }

    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        if self.allowed_hosts.is_empty() {
            return true;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(|host| host_without_port(host).to_ascii_lowercase());
        host.is_some_and(|host| self.allowed_hosts.contains(&host))
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        presented_token(headers)
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())))
    }
}

/// `host` without a trailing `:port` (`[::1]:80` → `[::1]`).
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(inside, _)| &host[..=inside.len()]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// The token of `Authorization: Bearer T`, or the password of `Authorization: Basic …` (what a browser
/// sends after its login prompt; the user name is ignored).
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        return decoded
            .split_once(':')
            .map(|(_, password)| password.to_owned());
    }
    None
}

/// Whether `path` answers without a token (probes of orchestrators carry none).
fn is_probe(path: &str) -> bool {
    path == "/health" || path == "/ready"
}

/// Whether `path` serves live state (never readable cross-origin).
fn is_state(path: &str) -> bool {
    path.starts_with("/state/") || (path.starts_with("/instances/") && path.contains("/state/"))
}

/// The middleware applying `access` to every request of the router.
pub(super) async fn guard(
    State(access): State<HttpAccess>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    if !access.host_allowed(request.headers()) {
        return refusal(
            StatusCode::FORBIDDEN,
            "this host name is not allowed here (--http-allowed-host)",
            None,
        );
    }
    if !is_probe(&path) && !access.authorized(request.headers()) {
        // A browser opening the dashboard gets a login prompt (the token as the password).
        let challenge = if path == "/" {
            "Basic realm=\"processor\""
        } else {
            "Bearer realm=\"processor\""
        };
        return refusal(
            StatusCode::UNAUTHORIZED,
            "a token is required: send Authorization: Bearer TOKEN (--http-token)",
            Some(challenge),
        );
    }
    let mut response = next.run(request).await;
    if access.token.is_some() || is_state(&path) {
        response
            .headers_mut()
            .remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
    }
    response
}

fn refusal(code: StatusCode, error: &str, challenge: Option<&'static str>) -> Response {
    let body = serde_json::json!({ "error": error }).to_string();
    let mut response = (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response();
    if let Some(challenge) = challenge {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(challenge),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name.clone(), value.parse().unwrap());
        }
        map
    }

    #[test]
    fn tokens_and_hosts_are_checked() {
        let access = HttpAccess::default()
            .with_token("0123456789abcdef")
            .unwrap()
            .with_allowed_hosts(["Processor-1.internal", "127.0.0.1"])
            .unwrap();
        let bearer = headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdef")]);
        assert!(access.authorized(&bearer));
        let basic = base64::engine::general_purpose::STANDARD.encode("any:0123456789abcdef");
        assert!(access.authorized(&headers(&[(
            header::AUTHORIZATION,
            &format!("Basic {basic}")
        )])));
        assert!(!access.authorized(&headers(&[(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdeX"
        )])));
        assert!(!access.authorized(&HeaderMap::new()));
        assert!(access.host_allowed(&headers(&[(header::HOST, "processor-1.internal:9090")])));
        assert!(access.host_allowed(&headers(&[(header::HOST, "127.0.0.1")])));
        assert!(!access.host_allowed(&headers(&[(header::HOST, "evil.example:9090")])));
        assert!(!access.host_allowed(&HeaderMap::new()));
        assert!(HttpAccess::default().with_token("short").is_err());
        assert!(
            HttpAccess::default()
                .with_token("has space in the token")
                .is_err()
        );
        assert!(
            HttpAccess::default()
                .with_allowed_hosts(["http://x"])
                .is_err()
        );
        assert!(HttpAccess::default().with_allowed_hosts(["x:80"]).is_err());
        assert_eq!(host_without_port("[::1]:9090"), "[::1]");
        assert!(!format!("{access:?}").contains("0123456789abcdef"));
    }
}
