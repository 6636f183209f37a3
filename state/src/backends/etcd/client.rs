//! Reaching etcd: the URL (endpoints, credentials, key prefix, TLS files), the client connected with
//! them, and one bounded call that reconnects once when the server forgot the client's auth token.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::{BACKEND, DEFAULT_PREFIX};
use crate::{StateError, StateResult};

/// A parsed `etcd[s]://[user:password@]h1:p1,h2:p2[/prefix][?ca=…&cert=…&key=…]` URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct EtcdTarget {
    pub(crate) endpoints: Vec<String>,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) prefix: String,
    /// Present for `etcds://`.
    pub(crate) tls: Option<TlsFiles>,
}

/// The PEM files of an `etcds://` URL: the CA that signed the members' certificates, and the client's
/// own certificate and key when the cluster asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    pub(crate) identity: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for EtcdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl EtcdTarget {
    /// The URL with the password replaced, for logs and errors.
    pub(crate) fn redacted(&self) -> String {
        let user = self
            .credentials
            .as_ref()
            .map(|(user, _)| format!("{user}:***@"))
            .unwrap_or_default();
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|endpoint| {
                endpoint
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
            })
            .collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{user}{}/{}", hosts.join(","), self.prefix)
    }
}

/// Parses an etcd URL without ever echoing its password.
pub(crate) fn parse_etcd_url(raw: &str) -> StateResult<EtcdTarget> {
    let invalid = |reason: &str| {
        StateError::invalid(
            "etcd url",
            format!(
                "{reason}: use etcd://[user:password@]h1:2379,h2:2379[/prefix], or etcds://… with \
                 ?ca=/path/ca.pem[&cert=/path/client.pem&key=/path/client-key.pem] for TLS"
            ),
        )
    };
    let (rest, secure) = match (raw.strip_prefix("etcd://"), raw.strip_prefix("etcds://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err(invalid("not an etcd:// or etcds:// URL")),
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let credentials = match userinfo {
        Some(userinfo) => {
            let (user, password) = userinfo
                .split_once(':')
                .ok_or_else(|| invalid("credentials must be user:password"))?;
            if user.is_empty() {
                return Err(invalid("the user name is empty"));
            }
            Some((user.to_owned(), password.to_owned()))
        }
        None => None,
    };
    let http = if secure { "https" } else { "http" };
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| format!("{http}://{host}"))
        .collect();
    if endpoints.is_empty() {
        return Err(invalid("no endpoints"));
    }
    if hosts.split(',').map(str::trim).any(|host| {
        host.rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    }) {
        return Err(invalid("every endpoint needs host:port"));
    }
    let prefix = if path.is_empty() {
        DEFAULT_PREFIX.to_owned()
    } else if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let tls = tls_files(query, secure).map_err(|reason| invalid(&reason))?;
    Ok(EtcdTarget {
        endpoints,
        credentials,
        prefix,
        tls,
    })
}

/// The `ca`, `cert` and `key` parameters of an etcd URL's query: required `ca` for `etcds://`, none
/// for `etcd://`, `cert` and `key` together or not at all.
fn tls_files(query: &str, secure: bool) -> Result<Option<TlsFiles>, String> {
    let (mut ca, mut cert, mut key) = (None, None, None);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "ca" => &mut ca,
            "cert" => &mut cert,
            "key" => &mut key,
            other => {
                return Err(format!(
                    "unknown parameter `{other}` (ca, cert and key are known)"
                ));
            }
        };
        if value.is_empty() {
            return Err(format!("the parameter `{name}` has no file"));
        }
        *slot = Some(PathBuf::from(value));
    }
    if !secure {
        return match ca.is_some() || cert.is_some() || key.is_some() {
            true => Err("ca, cert and key are for etcds:// (TLS) URLs".to_owned()),
            false => Ok(None),
        };
    }
    let ca =
        ca.ok_or("etcds:// needs ?ca=/path/ca.pem, the CA that signed the members' certificates")?;
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("a client certificate needs both cert= and key=".to_owned()),
    };
    Ok(Some(TlsFiles { ca, identity }))
}

/// The client's TLS settings from the PEM files of `tls`.
fn tls_options(tls: &TlsFiles) -> StateResult<TlsOptions> {
    let read = |what: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|err| {
            StateError::invalid(what, format!("cannot read {}: {err}", path.display()))
        })
    };
    let mut options =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read("etcd ca file", &tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(
            read("etcd client certificate file", cert)?,
            read("etcd client key file", key)?,
        ));
    }
    Ok(options)
}

/// Connects a client to every endpoint of `target`.
pub(crate) async fn connect_client(target: &EtcdTarget, timeout: Duration) -> StateResult<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(5), timeout);
    if let Some((user, password)) = &target.credentials {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &target.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    let redacted = target.redacted();
    let mut client = crate::backends::bounded(
        timeout,
        BACKEND,
        "connect to",
        &redacted,
        Client::connect(target.endpoints.clone(), Some(options)),
    )
    .await?;
    // The client connects lazily: ask the cluster once, so an unreachable one fails here.
    let probe = client.get(
        format!("{}probe", target.prefix),
        Some(GetOptions::new().with_count_only()),
    );
    crate::backends::bounded(timeout, BACKEND, "reach", &redacted, probe).await?;
    Ok(client)
}

/// One call to the cluster through `client`, bounded by `timeout`, its errors naming `operation` and
/// `resource`. etcd forgets an auth token left unused for its `--auth-token-ttl` (5 min by default), and
/// the client does not notice: when the cluster answers "invalid auth token" (or "auth store is old"),
/// the client authenticates again and the call runs once more. Every etcd call of the crate goes here.
pub(crate) async fn etcd_call<T, F>(
    client: &Client,
    timeout: Duration,
    operation: &'static str,
    resource: &str,
    call: impl Fn(Client) -> F,
) -> StateResult<T>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let timed_out = || StateError::Timeout {
        backend: BACKEND,
        operation,
        resource: resource.to_owned(),
        timeout,
    };
    match tokio::time::timeout(timeout, call(client.clone())).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) if is_stale_auth(&err) => {
            tracing::debug!(
                operation,
                resource,
                "etcd auth token expired: authenticating again"
            );
            let refresh = client.refresh_token();
            crate::backends::bounded(timeout, BACKEND, "authenticate for", resource, refresh)
                .await?;
            crate::backends::bounded(timeout, BACKEND, operation, resource, call(client.clone()))
                .await
        }
        Ok(Err(err)) => Err(StateError::backend(BACKEND, operation, resource, err)),
        Err(_) => Err(timed_out()),
    }
}

/// Whether the cluster refused a call because the client's auth token is no longer valid.
fn is_stale_auth(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            message.contains("invalid auth token")
                || message.contains("revision of auth store is old")
        }
        _ => false,
    }
}
