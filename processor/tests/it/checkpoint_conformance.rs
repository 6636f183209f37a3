//! The checkpoint-store conformance suite (`processor::checkpoint::conformance`) on every store: the
//! directory store, the object store over `object_store`'s in-memory store, and the object store on a
//! real S3 server (SeaweedFS) — the same checks each.

use integration_tests::S3Server;
use processor::checkpoint::conformance::{CHECKS, ObjectStoreUnderTest, run};

mod directory {
    processor::checkpoint_store_conformance_tests!(
        processor::checkpoint::conformance::DirectoryStoreUnderTest::new()
    );
}

mod object_in_memory {
    processor::checkpoint_store_conformance_tests!(
        processor::checkpoint::conformance::ObjectStoreUnderTest::in_memory()
    );
}

/// Every check on one SeaweedFS server (a server per check would spend most of the test starting them).
#[test]
fn every_check_on_a_real_s3_server() {
    let server = S3Server::start_new();
    let options = server.options();
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = ObjectStoreUnderTest::at_url(&server.url("conformance"), &options);
    for (name, check) in CHECKS {
        eprintln!("check {name}");
        run(check, &store);
    }
}
