//! No code: this crate only pins dependency features so that every cargo command in the workspace
//! builds the shared dependencies (and RocksDB and librdkafka on top of them) once. See its Cargo.toml.
