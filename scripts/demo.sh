#!/usr/bin/env bash
# The main job on the embedded default: the processor fleet demo on librdkafka's in-process mock
# cluster, in-process locks and RocksDB in a temp dir. Installs the build prerequisites on a fresh Debian
# machine, builds into the same ./target the test command and plain `cargo` use, and runs
# `processor demo` with any arguments given (`bash scripts/demo.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/build-env.sh
prepare_build
exec cargo run -p processor-cli -- demo "$@"
