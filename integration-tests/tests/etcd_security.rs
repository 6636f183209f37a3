//! The etcd backend's transport security and authentication, from one URL, against real etcd: TLS with
//! a client certificate (`etcds://…?ca=…&cert=…&key=…`), the ways a TLS connection is refused, and
//! username/password authentication (`etcd://user:password@…`) with the password never shown.

use std::time::Duration;

use integration_tests::{Certificates, EtcdCluster};
use state::{DistributedLock, EtcdDistributedLock, StateError};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(5);

/// Connecting with `url` fails, within 5 s, with an error whose cause mentions `why` and that does not
/// contain `secret` (when given). (A certificate the member rejects, or plain text to its TLS port, ends
/// with an alert, a transport error or a closed connection, depending on timing: those cases only ask for
/// the failure.)
async fn refused(url: &str, why: &str, secret: Option<&str>) -> StateError {
    let started = Instant::now();
    let err = match EtcdDistributedLock::new(url).await {
        Ok(lock) => panic!("{url} connected: {lock:?}"),
        Err(err) => err,
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{url} took {:?} to fail",
        started.elapsed()
    );
    if let Some(secret) = secret {
        let shown = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
        assert!(!shown.contains(secret), "the password shows in: {shown}");
    }
    let cause = std::error::Error::source(&err)
        .map_or_else(|| err.to_string(), |source| format!("{source:?}"));
    assert!(
        cause.contains(why),
        "{url}: expected `{why}` in the cause of {err}: {cause}"
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_locks_and_fences() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::single_with_tls();
    let url = cluster.url("tls");
    assert!(url.starts_with("etcds://"), "{url}");

    let lock = EtcdDistributedLock::new(&url)
        .await
        .expect("connect over TLS");
    let guard = lock.acquire("secure", TTL).await.expect("acquire over TLS");
    assert!(
        lock.try_acquire("secure", TTL)
            .await
            .expect("ask")
            .is_none()
    );
    let first = guard.fencing_token();
    guard.release().await.expect("release over TLS");

    // The same URL through `state::connect`: lock, fenced values and tasks on the TLS cluster.
    let backend = state::connect(&url).await.expect("state::connect over TLS");
    let guard = backend.lock.acquire("secure", TTL).await.expect("acquire");
    assert!(guard.fencing_token() > first);
    backend
        .fenced
        .write("ledger", guard.fencing_token(), b"over tls")
        .await
        .expect("a fenced write over TLS");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_are_one_clear_error_each() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::single_with_tls();
    let tls = cluster.certificates().expect("a TLS cluster");
    let address = cluster.member(0).address();
    let elsewhere = tempfile::tempdir().expect("a temp dir");
    let stranger = Certificates::make(elsewhere.path());

    // No client certificate: the member requires one.
    refused(
        &format!("etcds://{address}/tls?ca={}", tls.ca().display()),
        "",
        None,
    )
    .await;
    // A CA that did not sign the member's certificate.
    refused(
        &format!(
            "etcds://{address}/tls?ca={}&cert={}&key={}",
            stranger.ca().display(),
            tls.client_cert().display(),
            tls.client_key().display()
        ),
        "invalid peer certificate",
        None,
    )
    .await;
    // A client certificate the member's CA did not sign.
    refused(
        &format!(
            "etcds://{address}/tls?ca={}&cert={}&key={}",
            tls.ca().display(),
            stranger.client_cert().display(),
            stranger.client_key().display()
        ),
        "",
        None,
    )
    .await;
    // Plain text to a TLS port.
    refused(&format!("etcd://{address}/tls"), "", None).await;
    // A CA file that is not there: invalid input naming the file, before any connection.
    let missing = elsewhere.path().join("missing-ca.pem");
    match refused(
        &format!("etcds://{address}/tls?ca={}", missing.display()),
        "missing-ca.pem",
        None,
    )
    .await
    {
        StateError::InvalidInput { what, reason } => {
            assert_eq!(what, "etcd ca file");
            assert!(reason.contains("missing-ca.pem"), "{reason}");
        }
        other => panic!("a missing CA file: {other:?}"),
    }
}

/// Turns etcd's user/password auth on with user `root` and `password`.
async fn enable_auth(cluster: &EtcdCluster, password: &str) {
    let admin = EtcdDistributedLock::new(&cluster.url("auth"))
        .await
        .expect("connect before auth is on");
    let mut client = admin.client().clone();
    client
        .user_add("root", password, None)
        .await
        .expect("add root");
    client
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    client.auth_enable().await.expect("enable auth");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_come_from_the_url_and_never_show() {
    const PASSWORD: &str = "s3cret-Passw0rd";
    integration_tests::init_tracing();
    let cluster = EtcdCluster::single();
    let address = cluster.member(0).address();
    enable_auth(&cluster, PASSWORD).await;

    let lock = EtcdDistributedLock::new(&format!("etcd://root:{PASSWORD}@{address}/auth"))
        .await
        .expect("the right password connects");
    let guard = lock
        .acquire("guarded", TTL)
        .await
        .expect("acquire with auth");
    guard.release().await.expect("release with auth");
    let shown = format!("{lock:?}");
    assert!(!shown.contains(PASSWORD), "{shown}");

    let wrong = format!("etcd://root:not-{PASSWORD}@{address}/auth");
    refused(&wrong, "invalid user ID or password", Some(PASSWORD)).await;
    refused(
        &format!("etcd://{address}/auth"),
        "user name is empty",
        None,
    )
    .await;
}

/// etcd forgets an auth token left unused for `--auth-token-ttl` (5 min by default; 1 s here): a lock
/// handle, its fenced store and its task store idle longer than that authenticate again instead of
/// failing every call with "invalid auth token".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_handle_authenticates_again_when_its_token_expires() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::single_with_flags(&["--auth-token-ttl", "1"]);
    enable_auth(&cluster, "pw").await;
    let url = format!("etcd://root:pw@{}/idle", cluster.member(0).address());
    let backend = state::connect(&url).await.expect("connect with auth");
    let guard = backend.lock.acquire("idle", TTL).await.expect("acquire");
    guard.release().await.expect("release");

    tokio::time::sleep(Duration::from_secs(4)).await; // the token expires unused
    let guard = backend
        .lock
        .acquire("idle", TTL)
        .await
        .expect("acquire after the token expired");
    guard.release().await.expect("release");

    tokio::time::sleep(Duration::from_secs(4)).await;
    backend
        .fenced
        .write("idle", 1, b"still authenticated")
        .await
        .expect("a fenced write after the token expired");

    tokio::time::sleep(Duration::from_secs(4)).await;
    backend
        .tasks
        .due(0, 10)
        .await
        .expect("a task query after the token expired");
}
