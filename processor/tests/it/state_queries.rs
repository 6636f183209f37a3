//! Queries of live state over HTTP: any member answers `GET /state/{key}` from the owner of the key's
//! partition (forwarded when the owner is another member), with the value, the offset it reflects and
//! the owner's fencing token; after the owner dies, the same query is answered by the new owner with a
//! higher token; with a token on the endpoints, members forward it (and a query without it is refused).
//! And keys go to the partitions `partition_for_key` says, as librdkafka places them.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use processor::aggregation::Aggregate;
use processor::dev::Workload;
use processor::fleet::query::{StateAnswer, partition_for_key};
use processor::http::state_queries::fetch_answer;
use processor::http::{HttpAccess, LocalInstances, router, serve, status_url};
use processor::{Instance, InstanceConfig, InstanceStatus, Services};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{TestBroker, wait_for};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 4;
/// The endpoints' bearer token.
const TOKEN: &str = "state-queries-token-0123";

struct Member {
    base: String,
    run: tokio::task::JoinHandle<processor::ProcessorResult<()>>,
    server: CancellationToken,
    status: watch::Receiver<InstanceStatus>,
}

/// Instance `id` with its own HTTP endpoint (where it serves is recorded in the membership).
async fn member(services: &Services, brokers: &str, root: &std::path::Path, id: &str) -> Member {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = InstanceConfig::new(id, TOPIC, PARTITIONS, brokers, root.join(id))
        .with_claim_ttl(Duration::from_millis(1_500))
        .with_status_url(&status_url(&base, id));
    let instance = Instance::new(config, services.clone()).unwrap();
    let instances = Arc::new(LocalInstances::default());
    instances.add(Arc::clone(&instance));
    let server = CancellationToken::new();
    let access = HttpAccess::default().with_token(TOKEN).unwrap();
    tokio::spawn(serve(
        listener,
        router(instances, None, access),
        server.clone(),
    ));
    Member {
        base,
        status: instance.status(),
        run: tokio::spawn(instance.run(CancellationToken::new())),
        server,
    }
}

async fn query(base: &str, key: &str, partition: i32) -> StateAnswer {
    let access = HttpAccess::default().with_token(TOKEN).unwrap();
    fetch_answer(
        &format!("{base}/state/{key}?partition={partition}"),
        &access,
    )
    .await
    .unwrap()
}

fn aggregate_of(answer: &StateAnswer) -> Aggregate {
    serde_json::from_value(
        answer
            .value
            .clone()
            .unwrap_or_else(|| panic!("no value: {answer:?}")),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_member_answers_from_the_owner_and_after_a_hand_off_from_the_new_one() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 4_000,
        keys: 40,
        seed: 3,
        partitions: PARTITIONS,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("checkpoints")).unwrap();
    let a = member(&services, &brokers, root.path(), "a").await;
    let b = member(&services, &brokers, root.path(), "b").await;
    let caught_up = |s: &InstanceStatus| {
        !s.partition_status.is_empty() && s.partition_status.values().all(|p| p.lag == Some(0))
    };
    let b_now = wait_for(
        &b.status,
        "b to own and catch up",
        Duration::from_secs(60),
        |s| !s.owned.is_empty() && s.members.len() == 2 && caught_up(s),
    )
    .await;
    wait_for(&a.status, "a to catch up", Duration::from_secs(60), |s| {
        !s.owned.is_empty() && caught_up(s)
    })
    .await;

    // A key of a partition b owns, asked of a: forwarded to b.
    let (&partition, &b_token) = b_now.owned.iter().next().unwrap();
    let key = (0..4_000)
        .map(|i| workload.record(i))
        .find(|(p, _, _)| *p == partition)
        .map(|(_, key, _)| key)
        .unwrap();
    let answer = query(&a.base, &key, partition).await;
    assert_eq!(answer.owner, "b", "{answer:?}");
    assert_eq!(answer.fencing_token, b_token);
    assert_eq!(answer.partition, partition);
    assert!(answer.found);
    assert_eq!(
        aggregate_of(&answer),
        workload.expected()[&key],
        "the owner's current value"
    );
    let end: i64 = (0..4_000)
        .filter(|i| workload.record(*i).0 == partition)
        .count() as i64;
    assert_eq!(answer.next_offset, end, "the offset the value reflects");
    // Asked of b itself, the same answer; an unknown key is an answer too.
    assert_eq!(query(&b.base, &key, partition).await, answer);
    let missing = query(&a.base, "no-such-key", partition).await;
    assert!(!missing.found && missing.value.is_none());
    let refused = fetch_answer(
        &format!("{}/state/{key}?partition={partition}", a.base),
        &HttpAccess::default(),
    )
    .await;
    let refused = format!("{:?}", refused.err());
    assert!(refused.contains("401"), "no token, no answer: {refused}");

    // b dies; a takes its partitions over and answers with a higher token.
    b.run.abort();
    b.server.cancel();
    // The new owner replays from the last checkpoint (b may have taken none): its answers follow
    // its progress; once caught up it answers the final value.
    let a_after = wait_for(
        &a.status,
        "a to own b's partition and catch up",
        Duration::from_secs(60),
        |s| {
            s.owned.contains_key(&partition)
                && s.partition_status
                    .get(&partition)
                    .is_some_and(|p| p.next_offset == end)
        },
    )
    .await;
    let after = query(&a.base, &key, partition).await;
    assert_eq!(after.owner, "a", "{after:?}");
    assert_eq!(after.fencing_token, a_after.owned[&partition]);
    assert!(
        after.fencing_token > answer.fencing_token,
        "{after:?} after {answer:?}"
    );
    assert_eq!(aggregate_of(&after), workload.expected()[&key]);
    assert_eq!(after.next_offset, end);
    a.run.abort();
    a.server.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_go_to_the_partitions_partition_for_key_names() {
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for i in 0..50 {
        let key = format!("user-{i}");
        let delivered = producer
            .send(
                FutureRecord::to(TOPIC).key(&key).payload("1"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(
            delivered.partition,
            partition_for_key(key.as_bytes(), PARTITIONS),
            "{key}"
        );
    }
}

/// A member serving its endpoint over `https://` (its certificate signed by a private CA) is reached by a
/// forwarded query when the asking member trusts that CA (`--http-ca-file`), with the token; without
/// the CA the TLS handshake refuses it. Before, forwarding spoke plain HTTP only, so an `https://`
/// member was never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_query_reaches_an_https_member_that_its_ca_signed() {
    use std::sync::Arc as StdArc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = tempfile::tempdir().unwrap();
    let certificates = integration_tests::Certificates::make(dir.path());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certificates.server_cert())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(certificates.server_key()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(StdArc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(StdArc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer: StateAnswer = serde_json::from_value(serde_json::json!({
        "key": "k", "partition": 1, "owner": "tls-member", "fencing_token": 9, "next_offset": 7,
        "found": true, "value": {"count": 3}, "value_hex": null,
    }))
    .unwrap();
    let body = serde_json::to_string(&answer).unwrap();
    let seen_token = StdArc::new(std::sync::Mutex::new(None::<bool>));
    let server = {
        let seen_token = StdArc::clone(&seen_token);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut request = vec![0u8; 4096];
                let read = stream.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..read]).to_lowercase();
                *seen_token.lock().unwrap() = Some(
                    request.contains(&format!("authorization: bearer {}", TOKEN.to_lowercase())),
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        })
    };
    let url = format!("https://127.0.0.1:{port}/instances/tls-member/state/k?partition=1");
    let trusting = HttpAccess::default()
        .with_token(TOKEN)
        .unwrap()
        .with_forwarding_ca(&certificates.ca())
        .unwrap();
    let got = fetch_answer(&url, &trusting).await.unwrap();
    assert_eq!(got, answer);
    assert_eq!(
        *seen_token.lock().unwrap(),
        Some(true),
        "the token went along"
    );
    let unknown_ca = fetch_answer(&url, &HttpAccess::default()).await;
    assert!(unknown_ca.is_err(), "a CA nobody trusts: {unknown_ca:?}");
    server.abort();
}
