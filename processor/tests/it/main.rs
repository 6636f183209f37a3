//! The processor's integration suites, one module each, in ONE test binary. Each test binary that
//! links the processor carries RocksDB and librdkafka (about 100 MB in a debug build): one binary instead
//! of fourteen saves thirteen links and some 1.3 GB of disk per build. Run one suite with
//! `cargo test -p fenced-processor --test it -- SUITE::` (e.g. `exactly_once::`); the suites that talk to a
//! broker run on librdkafka's mock cluster unless `PROCESSOR_TEST_BROKER=kafka` (see `support`).

mod support;

mod checkpoint_clock;
mod checkpoint_conformance;
mod decoders;
mod demo;
mod exactly_once;
mod fleet;
mod missing_offsets;
mod pipeline;
mod poison;
mod restore;
mod s3_faults;
mod s3_server;
mod standby;
mod state_queries;
mod state_work;
mod topology;
mod windows;
