//! The operations endpoint of a process running fleet instances (`processor run --http ADDR`, and the
//! demo's `--http`): Prometheus metrics, liveness and readiness, the status of each instance, and the
//! live fleet dashboard.
//!
//! | path | answers |
//! |---|---|
//! | `/` | the dashboard: plain HTML and JavaScript polling every member's status |
//! | `/metrics` | Prometheus text, from the exporter the binary installed (see [`MetricsRender`]) |
//! | `/health` | liveness: `200` while the process serves requests |
//! | `/ready` | readiness: `200` when every local instance is ready (see [`Readiness`]), else `503` with the reasons in JSON |
//! | `/status` | the JSON [`InstanceStatus`] of the process's instance (a process running several, as the demo does, lists their ids) |
//! | `/instances/{id}/status` | the JSON status of one local instance (what each member records in the fleet's membership) |
//! | `/members` | the live members this process's instances see, with where each serves its status |
//! | `/state/{key}` | the live value of `key` from the owner of its partition, with the offset it reflects and the owner's fencing token, wherever the owner runs (see [`state_queries`]) |
//! | `/instances/{id}/state/{key}` | the same, only from instance `id`'s live state (`404` when it does not process the partition) |
//!
//! Status answers carry `Access-Control-Allow-Origin: *` (unless a token guards the endpoint), so a
//! dashboard served by one member can poll every other one; live state never does. Who may ask what is
//! [`access`]'s: an optional bearer token and an optional `Host` allow-list.
//!
//! [`Readiness`]: crate::fleet::readiness::Readiness
//! [`InstanceStatus`]: crate::fleet::InstanceStatus

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub mod access;
pub mod state_queries;

pub use access::HttpAccess;

use crate::error::{ProcessorError, ProcessorResult};
use crate::fleet::Instance;
use crate::status::unix_ms;

/// Renders the process's metrics as Prometheus text (the binary wraps its exporter's handle in one).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// The dashboard page: no build step, no dependency.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The instances a process runs, by id: the endpoint serves their status. The demo adds and removes
/// them as it starts and kills them.
#[derive(Default)]
pub struct LocalInstances {
    instances: RwLock<BTreeMap<String, Arc<Instance>>>,
}

impl std::fmt::Debug for LocalInstances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalInstances")
            .field("ids", &self.snapshot().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl LocalInstances {
    /// Serves `instance`'s status from now on.
    pub fn add(&self, instance: Arc<Instance>) {
        let id = instance.config().instance_id.clone();
        self.write().insert(id, instance);
    }

    /// Stops serving the status of instance `id` (it stopped or was killed).
    pub fn remove(&self, id: &str) {
        self.write().remove(id);
    }

    fn snapshot(&self) -> BTreeMap<String, Arc<Instance>> {
        self.instances
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Instance>>> {
        self.instances
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The status URL an instance records in the fleet's membership when this process serves at `base`
/// (`http://127.0.0.1:9090`).
pub fn status_url(base: &str, instance_id: &str) -> String {
    format!(
        "{}/instances/{}/status",
        base.trim_end_matches('/'),
        percent_encode(instance_id)
    )
}

/// Encodes what a path segment cannot hold as is.
fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Clone)]
struct Shared {
    instances: Arc<LocalInstances>,
    metrics: Option<MetricsRender>,
    access: HttpAccess,
}

/// The endpoint's routes over `instances`, with `metrics` serving `/metrics` (404 without), guarded
/// by `access` ([`HttpAccess::default`] for an open endpoint).
pub fn router(
    instances: Arc<LocalInstances>,
    metrics: Option<MetricsRender>,
    access: HttpAccess,
) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(prometheus))
        .route("/status", get(status))
        .route("/instances/{id}/status", get(instance_status))
        .route("/members", get(members))
        .route("/state/{key}", get(state_queries::state))
        .route(
            "/instances/{id}/state/{key}",
            get(state_queries::instance_state),
        )
        .layer(axum::middleware::from_fn_with_state(
            access.clone(),
            access::guard,
        ))
        .with_state(Shared {
            instances,
            metrics,
            access,
        })
}

/// Binds `addr` (one clear error when it cannot: in use, not an address of this host).
///
/// # Errors
/// [`ProcessorError::InvalidInput`] (`http address`) when the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> ProcessorResult<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| ProcessorError::InvalidInput {
            what: "http address",
            reason: format!("cannot listen on {addr}: {err} (pick a free port, or port 0)"),
        })
}

/// Serves `router` on `listener` until `stop` fires.
///
/// # Errors
/// An I/O error of the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) -> ProcessorResult<()> {
    let addr = listener
        .local_addr()
        .map_err(|err| ProcessorError::InvalidInput {
            what: "http address",
            reason: err.to_string(),
        })?;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(ProcessorError::io(format!("the HTTP endpoint on {addr}")))
}

/// A JSON answer any origin may read (status, health): nothing in it is the job's data.
fn json_with_cors(code: StatusCode, body: &impl Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"));
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// A JSON answer for this origin only (live state): no CORS header.
fn json_same_origin(code: StatusCode, body: &impl Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"));
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn health() -> Response {
    json_with_cors(StatusCode::OK, &serde_json::json!({"status": "alive"}))
}

async fn ready(State(shared): State<Shared>) -> Response {
    let instances = shared.instances.snapshot();
    if instances.is_empty() {
        return json_with_cors(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"ready": false, "reasons": ["no instance runs in this process"]}),
        );
    }
    let checks = futures::future::join_all(instances.values().map(|i| i.readiness())).await;
    let ready = checks.iter().all(|check| check.ready);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let reasons: Vec<String> = checks
        .iter()
        .flat_map(|check| {
            check
                .reasons
                .iter()
                .map(move |reason| format!("{}: {reason}", check.instance_id))
        })
        .collect();
    json_with_cors(
        code,
        &serde_json::json!({"ready": ready, "reasons": reasons, "instances": checks}),
    )
}

/// Sets the gauges that are ages (they change with time, not with events) just before a scrape.
fn publish_ages(instances: &BTreeMap<String, Arc<Instance>>) {
    let now = unix_ms(std::time::SystemTime::now());
    for instance in instances.values() {
        let status = instance.status().borrow().clone();
        for (partition, p) in &status.partition_status {
            let labels = [
                ("topic", status.topic.clone()),
                ("partition", partition.to_string()),
            ];
            if let Some(at) = p.last_checkpoint_ms {
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!("processor_checkpoint_age_seconds", &labels)
                    .set(now.saturating_sub(at) as f64 / 1000.0);
            }
        }
    }
}

async fn prometheus(State(shared): State<Shared>) -> Response {
    match &shared.metrics {
        Some(render) => {
            publish_ages(&shared.instances.snapshot());
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                render(),
            )
                .into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "no metrics exporter is installed in this process",
        )
            .into_response(),
    }
}

/// An instance's status as JSON, with `now_ms` — the server's clock when it answered — so that a
/// client computes ages and expiries without trusting its own clock.
fn status_json(instance: &Instance) -> serde_json::Value {
    let mut status = serde_json::to_value(&*instance.status().borrow())
        .unwrap_or_else(|err| serde_json::json!({"error": err.to_string()}));
    if let Some(fields) = status.as_object_mut() {
        fields.insert(
            "now_ms".to_owned(),
            unix_ms(std::time::SystemTime::now()).into(),
        );
    }
    status
}

async fn status(State(shared): State<Shared>) -> Response {
    let instances = shared.instances.snapshot();
    match instances.len() {
        1 => {
            let status = instances.values().next().map(|i| status_json(i));
            json_with_cors(StatusCode::OK, &status)
        }
        _ => json_with_cors(
            StatusCode::NOT_FOUND,
            &serde_json::json!({
                "error": "this process runs several instances (or none): ask /instances/{id}/status",
                "instances": instances.keys().collect::<Vec<_>>(),
            }),
        ),
    }
}

async fn instance_status(State(shared): State<Shared>, Path(id): Path<String>) -> Response {
    match shared.instances.snapshot().get(&id) {
        Some(instance) => json_with_cors(StatusCode::OK, &status_json(instance)),
        None => json_with_cors(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no instance {id} runs in this process")}),
        ),
    }
}

/// A live member and where it serves its status.
#[derive(Debug, Serialize)]
struct MemberEndpoint {
    id: String,
    status_url: Option<String>,
}

async fn members(State(shared): State<Shared>) -> Response {
    let mut members: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (id, instance) in shared.instances.snapshot() {
        let status = instance.status().borrow().clone();
        for member in status.members {
            let url = status.member_endpoints.get(&member).cloned();
            let known = members.entry(member).or_default();
            if known.is_none() {
                *known = url;
            }
        }
        // A local instance is reachable here even before its membership is seen.
        let local = format!("/instances/{}/status", percent_encode(&id));
        members.entry(id).or_insert(None).get_or_insert(local);
    }
    let listed: Vec<MemberEndpoint> = members
        .into_iter()
        .map(|(id, status_url)| MemberEndpoint { id, status_url })
        .collect();
    json_with_cors(StatusCode::OK, &listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_urls_encode_the_instance_id() {
        assert_eq!(
            status_url("http://127.0.0.1:9090/", "p 1/x"),
            "http://127.0.0.1:9090/instances/p%201%2Fx/status"
        );
    }
}
