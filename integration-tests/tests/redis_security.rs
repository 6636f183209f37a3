//! Redis transport security and access control against real servers: TLS with a private CA and client
//! certificates (`rediss://…?ca=…&cert=…&key=…`), each way a TLS connection is refused, and an ACL user
//! allowed only the keys under the lock's prefix.

use std::time::Duration;

use integration_tests::RedisServer;
use state::{DistributedLock, RedisDistributedLock, StateError};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(5);

/// Connecting (and locking) with `url` fails within 5 s; the error, its cause or the lock error.
async fn refused(url: &str) -> String {
    let started = Instant::now();
    let outcome = match RedisDistributedLock::new(url).await {
        Err(err) => Err(err),
        Ok(lock) => lock.try_acquire("refused", TTL).await.map(|_| ()),
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{url} took {:?} to fail",
        started.elapsed()
    );
    match outcome {
        Ok(()) => panic!("{url} was accepted"),
        Err(err) => format!("{err} / {:?}", std::error::Error::source(&err)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_client_certificates() {
    integration_tests::init_tracing();
    let server = RedisServer::start_tls(true);
    let url = server.url();
    assert!(
        url.starts_with("rediss://") && url.contains("&cert="),
        "{url}"
    );

    let lock = RedisDistributedLock::new(&url)
        .await
        .expect("connect over TLS");
    let guard = lock.acquire("secure", TTL).await.expect("acquire over TLS");
    assert!(
        lock.try_acquire("secure", TTL)
            .await
            .expect("ask")
            .is_none()
    );
    guard.release().await.expect("release over TLS");

    let backend = state::connect(&url).await.expect("state::connect over TLS");
    let guard = backend.lock.acquire("secure", TTL).await.expect("acquire");
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
    let server = RedisServer::start_tls(true);
    let tls = server.certificates().expect("a TLS server");
    let port = server.port();
    let ca = tls.ca();

    // The public roots do not know the private CA.
    let untrusted = refused(&format!("rediss://127.0.0.1:{port}")).await;
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
    // The server asks for a client certificate and gets none.
    refused(&format!("rediss://127.0.0.1:{port}?ca={}", ca.display())).await;
    // Plain text to the TLS port.
    refused(&format!("redis://127.0.0.1:{port}")).await;
    // Half a client identity, and a CA file that is not there: invalid input before any connection.
    for (url, what) in [
        (
            format!(
                "rediss://127.0.0.1:{port}?ca={}&cert={}",
                ca.display(),
                tls.client_cert().display()
            ),
            "redis url",
        ),
        (
            format!("rediss://127.0.0.1:{port}?ca=/nonexistent/ca.pem"),
            "redis ca file",
        ),
        (
            format!("redis://127.0.0.1:{port}?ca={}", ca.display()),
            "redis url",
        ),
    ] {
        match RedisDistributedLock::new(&url).await {
            Err(StateError::InvalidInput { what: got, .. }) => assert_eq!(got, what, "{url}"),
            other => panic!("{url}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_limited_to_the_lock_prefix_can_lock_only_there() {
    const PASSWORD: &str = "acl-s3cret";
    integration_tests::init_tracing();
    let server = RedisServer::start_new();
    let client = redis::Client::open(server.url()).expect("a client");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect as default");
    let user = [
        "SETUSER".to_owned(),
        "locker".to_owned(),
        "on".to_owned(),
        format!(">{PASSWORD}"),
        "~app:*".to_owned(),
        "+@all".to_owned(),
        "-@admin".to_owned(),
    ];
    let _: () = redis::cmd("ACL")
        .arg(&user[..])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let url = format!("redis://locker:{PASSWORD}@127.0.0.1:{}", server.port());

    let own = RedisDistributedLock::new(&url)
        .await
        .expect("the ACL user connects")
        .with_key_prefix("app:")
        .expect("a valid prefix");
    let mut guard = own.acquire("job", TTL).await.expect("acquire under app:");
    own.extend(&mut guard, TTL)
        .await
        .expect("extend under app:");
    guard.release().await.expect("release under app:");

    let outside = RedisDistributedLock::new(&url).await.expect("connect");
    match outside.try_acquire("job", TTL).await {
        Err(err) => {
            let shown = format!("{:?}", std::error::Error::source(&err));
            assert!(shown.contains("no permissions"), "{err}: {shown}");
        }
        Ok(granted) => panic!("a lock outside the user's keys: {granted:?}"),
    }

    let wrong = refused(&format!(
        "redis://locker:not-{PASSWORD}@127.0.0.1:{}",
        server.port()
    ))
    .await;
    assert!(!wrong.contains(PASSWORD), "{wrong}");
}
