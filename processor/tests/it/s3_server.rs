//! The S3 server the object-store tests run on (SeaweedFS) enforces what the checkpoint store's fencing
//! relies on: `If-None-Match: *` lets exactly one of many *concurrent* writers create an object (a race
//! there was reported in at least one S3-compatible server), and `If-Match` with an ETag that is no
//! longer current is refused. If a server ever fails this, the store's fencing cannot be trusted on it.

// A test: helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use integration_tests::S3Server;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
use processor::checkpoint::ObjectCheckpointStore;

const WRITERS: usize = 8;
const ROUNDS: usize = 12;

fn client(server: &S3Server) -> Arc<dyn ObjectStore> {
    let options = server.options();
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ObjectCheckpointStore::open_url_with(&server.url("race"), &options)
        .expect("a client")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn if_none_match_admits_exactly_one_of_many_concurrent_writers() {
    let server = S3Server::start_new();
    let store = client(&server);
    for round in 0..ROUNDS {
        let path = Path::from(format!("race/create-{round}"));
        let writers = (0..WRITERS).map(|writer| {
            let (store, path) = (store.clone(), path.clone());
            tokio::spawn(async move {
                let create = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                store
                    .put_opts(&path, format!("writer {writer}").into(), create)
                    .await
            })
        });
        let outcomes = futures::future::join_all(writers).await;
        let (mut won, mut refused) = (0, 0);
        for outcome in outcomes {
            match outcome.expect("writer task") {
                Ok(_) => won += 1,
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {
                    refused += 1;
                }
                Err(other) => panic!("round {round}: unexpected error {other}"),
            }
        }
        assert_eq!(
            (won, refused),
            (1, WRITERS - 1),
            "round {round}: exactly one concurrent If-None-Match write may succeed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn if_match_with_an_etag_no_longer_current_is_refused() {
    let server = S3Server::start_new();
    let store = client(&server);
    let path = Path::from("race/update");
    let first = store.put(&path, "first".into()).await.expect("first write");
    let second = store
        .put_opts(
            &path,
            "second".into(),
            PutOptions {
                mode: PutMode::Update(UpdateVersion::from(first.clone())),
                ..PutOptions::default()
            },
        )
        .await
        .expect("an update with the current ETag succeeds");
    assert_ne!(first.e_tag, second.e_tag);
    let stale = store
        .put_opts(
            &path,
            "stale".into(),
            PutOptions {
                mode: PutMode::Update(UpdateVersion::from(first)),
                ..PutOptions::default()
            },
        )
        .await;
    assert!(
        matches!(stale, Err(object_store::Error::Precondition { .. })),
        "a write with a stale ETag must be refused: {stale:?}"
    );
    let now = store
        .get(&path)
        .await
        .expect("read")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&now[..], b"second", "the refused write changed nothing");
}
