//! The `processor` binary's integration suites, one module per suite, in one test binary: each test
//! binary that links the processor carries ~100 MB of RocksDB and librdkafka, so seven binaries were
//! seven such links per build. Run one suite with `cargo test -p processor-cli --test cli -- SUITE::`.
//!
//! - `configuration`: `processor run`'s settings from flags, environment and a TOML file (`config check`);
//! - `dashboard`: the live fleet dashboard in headless Chromium while the demo kills an instance;
//! - `exactly_once_processes`: exactly-once outputs of `processor run` processes through kills and pauses;
//! - `fleet_processes`: a fleet of `processor run` processes through SIGKILL and SIGSTOP, exact state;
//! - `full_disk`: a full disk under the state directory (a tmpfs): one line, non-zero exit, exact after;
//! - `kafka_security`: SASL_SSL through the client-settings passthrough, the password in no log;
//! - `operations`: the operations endpoint scraped from outside (metrics, readiness, fleet status);
//! - `support`: the helpers they share.

mod configuration;
mod dashboard;
mod exactly_once_processes;
mod fleet_processes;
mod full_disk;
mod kafka_security;
mod operations;
mod support;
