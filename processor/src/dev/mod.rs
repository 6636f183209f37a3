//! Development fixtures, kept apart from the production paths: librdkafka's mock cluster as an embedded
//! broker ([`broker`]), topic administration on a real broker ([`admin`]), a deterministic workload with its exact expected result ([`workload`]), and the
//! fleet demo that runs on them ([`demo`]). The demo, the tests, the benchmarks and `processor
//! dev-broker`/`produce` use them; nothing in [`crate::fleet`] does.

pub mod admin;
pub mod broker;
pub mod demo;
pub mod workload;

pub use broker::DevBroker;
pub use workload::Workload;
