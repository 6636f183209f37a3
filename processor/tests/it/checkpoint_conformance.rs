//! The checkpoint-store conformance suite (`processor::checkpoint::conformance`) on the directory store:
//! the same checks every checkpoint store passes.

processor::checkpoint_store_conformance_tests!(
    processor::checkpoint::conformance::DirectoryStoreUnderTest::new()
);
