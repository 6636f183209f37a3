//! `GET /state/{key}`: the live value of `key`, answered by the owner of its partition. Any member
//! answers: a local instance that processes the partition reads its store; otherwise the query goes to
//! the member the fleet's assignment names as the owner (where it serves, from the membership), then to
//! the other members, each asked `GET /instances/{id}/state/{key}`, which answers only from local state.
//! `?partition=N` names the partition (keys produced with another partitioner than librdkafka's).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::{Shared, json_same_origin, percent_encode};
use crate::error::{ProcessorError, ProcessorResult};
use crate::fleet::Instance;
use crate::fleet::membership::owner_of;
use crate::fleet::query::StateAnswer;

/// How long a forwarded query may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
pub(super) struct StateQuery {
    partition: Option<i32>,
}

/// `GET /state/{key}`.
pub(super) async fn state(
    State(shared): State<Shared>,
    Path(key): Path<String>,
    Query(query): Query<StateQuery>,
) -> Response {
    let instances = shared.instances.snapshot();
    for instance in instances.values() {
        match answer_locally(instance, &key, query.partition).await {
            Ok(Some(answer)) => return json_same_origin(StatusCode::OK, &answer),
            Ok(None) => {}
            Err(err) => return failed(&err),
        }
    }
    let Some(instance) = instances.values().next() else {
        return json_same_origin(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "no instance runs in this process"}),
        );
    };
    let status = instance.status().borrow().clone();
    let partition = query
        .partition
        .unwrap_or_else(|| instance.partition_of(key.as_bytes()));
    // The assigned owner first; during a hand-off the partition may still be elsewhere.
    let mut candidates: Vec<&String> = status.members.iter().collect();
    if let Some(owner) = owner_of(&status.topic, status.partitions, partition, &status.members) {
        candidates.sort_by_key(|member| member.as_str() != owner);
    }
    for member in candidates {
        let Some(url) = status.member_endpoints.get(member) else {
            continue;
        };
        let Some(base) = url.strip_suffix("/status") else {
            continue;
        };
        let url = format!(
            "{base}/state/{}?partition={partition}",
            percent_encode(&key)
        );
        if let Ok(answer) = fetch_answer(&url, &shared.access).await {
            return json_same_origin(StatusCode::OK, &answer);
        }
    }
    json_same_origin(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({
            "error": format!("no member answers for partition {partition} of key `{key}`: its owner may be starting or moving, try again"),
            "partition": partition,
        }),
    )
}

/// `GET /instances/{id}/state/{key}`: only from instance `id`'s live state.
pub(super) async fn instance_state(
    State(shared): State<Shared>,
    Path((id, key)): Path<(String, String)>,
    Query(query): Query<StateQuery>,
) -> Response {
    let Some(instance) = shared.instances.snapshot().get(&id).cloned() else {
        return json_same_origin(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no instance {id} runs in this process")}),
        );
    };
    match answer_locally(&instance, &key, query.partition).await {
        Ok(Some(answer)) => json_same_origin(StatusCode::OK, &answer),
        Ok(None) => json_same_origin(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("instance {id} does not process the partition of key `{key}` now")}),
        ),
        Err(err) => failed(&err),
    }
}

async fn answer_locally(
    instance: &std::sync::Arc<Instance>,
    key: &str,
    partition: Option<i32>,
) -> ProcessorResult<Option<StateAnswer>> {
    let (instance, key) = (std::sync::Arc::clone(instance), key.to_owned());
    tokio::task::spawn_blocking(move || instance.query_local(key.as_bytes(), partition))
        .await
        .map_err(ProcessorError::task("query live state"))?
}

fn failed(err: &ProcessorError) -> Response {
    json_same_origin(
        StatusCode::INTERNAL_SERVER_ERROR,
        &serde_json::json!({"error": err.to_string()}),
    )
}

/// The largest forwarded answer read (a value of the job's state with its metadata); a member sending
/// more is treated as not answering.
pub const MAX_FORWARDED_ANSWER: usize = 16 << 20;

/// Asks `url` (a member's `/instances/{id}/state/{key}`, `http://` or `https://` — the platform's
/// trusted roots, and the CA of [`HttpAccess::with_forwarding_ca`](super::HttpAccess::with_forwarding_ca),
/// verify the member's certificate) for its answer, with `access`'s bearer token when it has one.
///
/// # Errors
/// The member cannot be reached, does not answer in time, answers more than
/// [`MAX_FORWARDED_ANSWER`] bytes, or answers anything but an answer.
pub async fn fetch_answer(url: &str, access: &super::HttpAccess) -> ProcessorResult<StateAnswer> {
    let unreachable = |reason: String| ProcessorError::Kafka {
        operation: "ask a member for live state",
        source: format!("{url}: {reason}").into(),
    };
    let uri: axum::http::Uri = url.parse().map_err(|err| unreachable(format!("{err}")))?;
    let mut request = axum::http::Request::get(uri);
    if let Some(token) = access.token() {
        request = request.header(axum::http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Empty::<axum::body::Bytes>::new())
        .map_err(|err| unreachable(err.to_string()))?;
    let client = access.forwarding_client()?;
    let response = tokio::time::timeout(FORWARD_TIMEOUT, client.request(request))
        .await
        .map_err(|_| unreachable(format!("no answer within {FORWARD_TIMEOUT:?}")))?
        .map_err(|err| unreachable(format!("{err:?}")))?;
    let code = response.status();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_FORWARDED_ANSWER);
    let body = tokio::time::timeout(FORWARD_TIMEOUT, limited.collect())
        .await
        .map_err(|_| unreachable("the answer did not arrive in time".to_owned()))?
        .map_err(|err| {
            unreachable(format!(
                "{err} (at most {MAX_FORWARDED_ANSWER} bytes are read)"
            ))
        })?
        .to_bytes();
    if code != StatusCode::OK {
        return Err(unreachable(format!(
            "{code}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body).map_err(|err| unreachable(format!("not an answer: {err}")))
}

/// An HTTP client for `http://` and `https://` members (rustls on ring).
pub(crate) type ForwardingClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<axum::body::Bytes>,
>;

/// The client with the platform's roots only, made once: its connection pool and roots are kept.
pub(crate) fn shared_forwarding_client() -> ProcessorResult<ForwardingClient> {
    static CLIENT: std::sync::OnceLock<Result<ForwardingClient, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| forwarding_client_with(None).map_err(|err| err.to_string()))
        .clone()
        .map_err(|reason| ProcessorError::InvalidInput {
            what: "http ca file",
            reason,
        })
}

/// A client trusting the platform's roots and the certificates in the PEM file `ca`, if any.
pub(crate) fn forwarding_client_with(
    ca: Option<&std::path::Path>,
) -> ProcessorResult<ForwardingClient> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let invalid = |reason: String| ProcessorError::InvalidInput {
        what: "http ca file",
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    // A platform root that does not parse is skipped (as the platform's own clients do).
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca {
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(Iterator::collect)
            .map_err(|err| invalid(format!("{}: {err}", ca.display())))?;
        if certificates.is_empty() {
            return Err(invalid(format!(
                "{} holds no PEM certificate",
                ca.display()
            )));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|err| invalid(format!("{}: {err}", ca.display())))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| invalid(err.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}
