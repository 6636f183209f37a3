//! Benchmarks live in `benches/`; run them with `cargo bench -p benches`. This library holds what they
//! share: the measurement loops ([`measure`]).

pub mod measure;
