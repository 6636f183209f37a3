#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (redis-server,
# PostgreSQL, etcd and protoc for its client, libfaketime, Java + Maven and the Apache Kafka broker jars,
# a Python venv with confluent-kafka for the independent output verifier, SeaweedFS as the S3 server),
# then runs formatting, lints, per-feature builds, docs, unit, conformance and
# real-server integration tests. `.ci/run` calls exactly this.
#
# Builds into ./target, which scripts/lib/build-env.sh makes a link to ~/.cache/state-coordination/target
# (outside the clone) unless it exists already: the demo command, this command and plain `cargo` in the
# repo share one build, and a fresh clone on the same machine rebuilds incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/build-env.sh
source scripts/lib/packages.sh

# Each step's time and the tests counted, printed at the end (also on failure): what a CI run spends
# where, and how many tests ran.
RUN_START=$SECONDS
STEP_NAME="setup (packages, Kafka jars, verifier)"
STEP_START=$SECONDS
STEP_LINES=()
LANE_TIME_LINES=()
TEST_LOG=$(mktemp)
step() {
  STEP_LINES+=("$(printf '%6ss  %s' "$((SECONDS - STEP_START))" "$STEP_NAME")")
  STEP_NAME="$1"
  STEP_START=$SECONDS
  log "$1"
}
report_times() {
  local status=$?
  STEP_LINES+=("$(printf '%6ss  %s' "$((SECONDS - STEP_START))" "$STEP_NAME")")
  printf '\n==> time per step\n'
  printf '%s\n' "${STEP_LINES[@]}"
  printf '%6ss  total\n' "$((SECONDS - RUN_START))"
  if [ "${#LANE_TIME_LINES[@]}" -gt 0 ]; then
    printf '\n==> suites in the lanes (wall, CPU, lane and selection)\n'
    printf '%s\n' "${LANE_TIME_LINES[@]}"
  fi
  local counts
  counts=$(awk '/^test result: /{for(i=1;i<NF;i++){if($(i+1)~/^passed/)p+=$i; if($(i+1)~/^failed/)f+=$i}} END{printf "%d passed, %d failed", p, f}' "$TEST_LOG")
  rm -f "$TEST_LOG"
  printf '\ntests: %s\n' "$counts"
  exit "$status"
}
trap report_times EXIT

# cargo test, its output also kept to count the tests at the end.
counted_test() {
  cargo test "$@" 2>&1 | tee -a "$TEST_LOG"
}

# One set of suites in a lane (see run_lanes): cargo test with the given selection, its output in the
# lane's log, its wall and CPU time in the lane's times. A failing suite fails the lane after the rest
# of the lane has run.
suite() {
  local started=$SECONDS status=0 cpu
  cpu=$(mktemp)
  { TIMEFORMAT='%U %S'; time cargo test --workspace --all-features "$@" >>"$LANE_LOG" 2>&1; } 2>"$cpu" ||
    status=$?
  local line
  line=$(awk -v wall="$((SECONDS - started))" -v what="$LANE ${*}" -v status="$status" \
    '{printf "%6ss %6.0fs CPU  %s%s", wall, $1 + $2, what, (status == 0 ? "" : "  FAILED")}' "$cpu")
  rm -f "$cpu"
  echo "$line" >>"$LANE_TIMES"
  echo "    $line"
  [ "$status" -eq 0 ] || LANE_FAILED=1
}

# The selection flags (`--test NAME`, `--bench NAME`) of every target of a kind (test or bench) in the
# workspace except those named. (`cargo test --benches` would also run every library's unit tests
# again: libraries are bench targets too.)
targets_except() {
  local kind="$1"
  shift
  cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
kind, skip = sys.argv[1], set(sys.argv[2:])
for package in json.load(sys.stdin)["packages"]:
    for target in package["targets"]:
        if kind in target["kind"] and target["name"] not in skip:
            print("--" + kind, target["name"])
' "$kind" "$@"
}

# Runs each lane (a shell function calling `suite`) in the background at once, each with its own
# slice of the test ports; then prints each lane's log in turn and fails if any lane failed.
run_lanes() {
  local dir lane index=0 count=$# pids=() failed=()
  dir=$(mktemp -d)
  for lane in "$@"; do
    (
      export TEST_PORT_LANE="$index/$count"
      LANE="$lane" LANE_LOG="$dir/$lane.log" LANE_TIMES="$dir/$lane.times" LANE_FAILED=0
      : >"$LANE_LOG"
      : >"$LANE_TIMES"
      "$lane"
      exit "$LANE_FAILED"
    ) &
    pids+=("$!")
    index=$((index + 1))
  done
  for index in "${!pids[@]}"; do
    wait "${pids[$index]}" || failed+=("${*:index+1:1}")
  done
  for lane in "$@"; do
    log "lane $lane"
    cat "$dir/$lane.log"
    cat "$dir/$lane.log" >>"$TEST_LOG"
    mapfile -t -O "${#LANE_TIME_LINES[@]}" LANE_TIME_LINES <"$dir/$lane.times"
  done
  rm -rf "$dir"
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "lanes failed: ${failed[*]}" >&2
    return 1
  fi
}

have_postgres() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

install_test_services() {
  # libfaketime: the clock-skew tests run a client process whose wall clock is hours off.
  # Java and Maven: the real Apache Kafka brokers (jars from Maven Central, see fetch_kafka_jars).
  # Chromium: the dashboard test opens the demo's dashboard in a headless browser.
  install_packages \
    "redis-server:command -v redis-server" \
    "postgresql:have_postgres" \
    "faketime:ls /usr/lib/*/faketime/libfaketime.so.1" \
    "openjdk-17-jre-headless:command -v java" \
    "maven:command -v mvn" \
    "python3-venv:python3 -c 'import ensurepip'" \
    "etcd-server:command -v etcd" \
    "openssl:command -v openssl" \
    "protobuf-compiler:command -v protoc" \
    "chromium:command -v chromium"
  # The packages start system-wide services; the tests start their own servers on free ports.
  command -v redis-server >/dev/null
  have_postgres
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    # PostgreSQL refuses to run as root: the fixtures run it as this user.
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
}

# The Apache Kafka broker's jars by Maven coordinates (integration-tests/kafka/pom.xml), once, into a
# cache outside the clone; the fixture (integration-tests/src/kafka_server.rs) reads them from there.
fetch_kafka_jars() {
  local libs="${KAFKA_LIBS:-$HOME/.cache/state-coordination/kafka-4.4.0/libs}"
  if [ -f "$libs/.complete" ]; then
    return 0
  fi
  log "fetching the Apache Kafka broker jars (Maven Central) into $libs"
  local scratch
  mkdir -p "$(dirname "$libs")"
  scratch=$(mktemp -d "$(dirname "$libs")/.libs-XXXXXX")
  if ! mvn -q -B -f integration-tests/kafka/pom.xml dependency:copy-dependencies \
      -DincludeScope=runtime "-DoutputDirectory=$scratch"; then
    echo "mvn could not fetch the Kafka broker jars: is Maven Central reachable?" >&2
    exit 1
  fi
  echo 4.4.0 >"$scratch/.complete"
  rm -rf "$libs"
  mv "$scratch" "$libs"
}

# The independent output verifier's Python environment (confluent-kafka from PyPI), once, outside the
# clone; integration-tests/src/verifier.rs runs integration-tests/verifier/verify_outputs.py in it.
prepare_verifier() {
  local venv="${VERIFIER_VENV:-$HOME/.cache/state-coordination/venv}"
  if "$venv/bin/python" -c 'import confluent_kafka' >/dev/null 2>&1; then
    return 0
  fi
  log "making the output verifier's Python environment in $venv (confluent-kafka from PyPI)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q confluent-kafka==2.16.1
}

# SeaweedFS (`weed`, Apache-2.0), the tests' S3-compatible server, once, outside the clone
# (integration-tests/src/s3_server.rs runs it). Built from the Go module proxy: `go install` refuses this
# module (its go.mod has a `replace` directive), so the module's source is downloaded and built where it
# lies (8 minutes on a new machine, then cached).
SEAWEEDFS_MODULE=github.com/seaweedfs/seaweedfs
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
install_weed() {
  local bin="${WEED_BIN:-$HOME/.cache/state-coordination/go-bin/weed}"
  if [ -x "$bin" ] && [ "$(cat "$bin.version" 2>/dev/null)" = "$SEAWEEDFS_VERSION" ]; then
    return 0
  fi
  command -v go >/dev/null || install_packages "golang-go:command -v go"
  log "building SeaweedFS $SEAWEEDFS_VERSION (the tests' S3 server) into $bin"
  local source scratch
  source=$(go mod download -json "$SEAWEEDFS_MODULE@$SEAWEEDFS_VERSION" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  scratch=$(mktemp -d)
  cp -r "$source/." "$scratch/"
  chmod -R u+w "$scratch"
  mkdir -p "$(dirname "$bin")"
  (cd "$scratch" && go build -o "$bin.tmp" ./weed)
  rm -rf "$scratch"
  mv "$bin.tmp" "$bin"
  echo "$SEAWEEDFS_VERSION" >"$bin.version"
}

prepare_build
install_test_services
fetch_kafka_jars
prepare_verifier
install_weed

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "layout rules: the lock crates never build Kafka or RocksDB; the processor library has no CLI deps"
# An embedder of `state` (and the lock test crate) must not pay the 25-30 minute RocksDB build, and an
# embedder of the `processor` library gets no argument parser or terminal UI.
forbidden_in() {
  local package="$1" edges="$2" pattern="$3" found
  found=$(cargo tree -q -p "$package" -e "$edges" --prefix none | grep -E "^($pattern) " | sort -u || true)
  if [ -n "$found" ]; then
    echo "layout rule broken: $package ($edges) depends on:" >&2
    echo "$found" >&2
    exit 1
  fi
}
forbidden_in fenced-state normal,dev,build "rdkafka|rdkafka-sys|rocksdb|librocksdb-sys"
forbidden_in integration-tests normal,dev,build "rdkafka|rdkafka-sys|rocksdb|librocksdb-sys"
forbidden_in benches normal,dev,build "rdkafka|rdkafka-sys|rocksdb|librocksdb-sys"
# (Runtime dependencies only: a proc-macro's own helpers, like prost-derive's anyhow, are not linked.)
forbidden_in fenced-processor normal,no-proc-macro "clap|indicatif|anyhow|tracing-subscriber"

step "each feature of state builds alone, without warnings"
# (Grepped rather than -D warnings in RUSTFLAGS, which would rebuild every dependency: an item only one
# feature uses, left ungated, warns in the others.)
check_feature_alone() {
  local output
  output=$(cargo check -q -p fenced-state --no-default-features "$@" 2>&1) || { echo "$output" >&2; return 1; }
  if grep -q '^warning' <<<"$output"; then
    echo "fenced-state ${*:-(no features)} builds with warnings:" >&2
    echo "$output" >&2
    return 1
  fi
}
check_feature_alone
for feature in redis postgres etcd conformance; do
  check_feature_alone --features "$feature"
done

step "docs build without warnings"
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --no-deps --all-features

step "docs.rs: every feature-gated item of fenced-state names its feature (nightly rustdoc, --cfg docsrs)"
# docs.rs builds with nightly and `--cfg docsrs` (package.metadata.docs.rs); the crate then turns on
# rustdoc's doc_cfg, which labels each item behind a cargo feature with it. Checked on the HTML.
rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
RUSTDOCFLAGS="--cfg docsrs -D warnings" cargo +nightly doc -q -p fenced-state --all-features --no-deps
for page_and_feature in backends/postgres/struct.PostgresDistributedLock:postgres \
  backends/redis/struct.RedisDistributedLock:redis backends/redlock/struct.RedlockDistributedLock:redis \
  backends/etcd/struct.EtcdDistributedLock:etcd conformance/index:conformance; do
  page="target/doc/state/${page_and_feature%%:*}.html"
  if ! grep -q "crate feature <code>${page_and_feature#*:}</code>" "$page"; then
    echo "docs.rs check: $page does not say it needs the feature ${page_and_feature#*:}" >&2
    exit 1
  fi
done

step "packages: cargo package, and a crate outside the workspace built and run from the .crate files"
check_rust_version
check_packages

step "tests: one build of every target"
cargo test --workspace --all-features --all-targets --no-run

step "tests in two lanes side by side (unit, conformance, real servers, processes, real broker, bench smoke runs)"
# Many suites wait on servers, TTLs and processes rather than on the CPU, so two lanes run at once (the
# machine has two cores: more lanes starved the timing of the fault scenarios — a torture run saw no
# holder reach its SIGSTOP within the run at a load of 16); each lane runs its suites one after another,
# with its own slice of the test ports (TEST_PORT_LANE). Every command names the same targets' features
# (--workspace --all-features): nothing rebuilds. The lanes name their slow suites; every other target
# (a new suite too) runs at the end of the second lane.
lane_kafka_and_locks() {
  suite --test it
  # The processor's Kafka-facing suites again, on a real Apache Kafka broker (the mock cluster stays
  # the fast default); the suites are modules of one test binary, the filters pick them.
  PROCESSOR_TEST_BROKER=kafka suite --test it -- pipeline:: fleet:: restore:: missing_offsets::
  suite --test conformance
  suite --test torture
}
lane_processes_and_the_rest() {
  # The `processor` binary's suites are modules of one test binary (`cli`), picked by filters.
  suite --test cli -- exactly_once_processes::
  suite --test cli -- fleet_processes::
  PROCESSOR_TEST_BROKER=kafka suite --test cli -- fleet_processes::
  suite --test cli -- --skip exactly_once_processes:: --skip fleet_processes::
  suite --test fraud_counters
  # shellcheck disable=SC2046 # one flag per word
  suite $(targets_except bench)
  # shellcheck disable=SC2046
  suite --lib --bins $(targets_except test it cli fraud_counters torture conformance)
}
run_lanes lane_kafka_and_locks lane_processes_and_the_rest

step "doc tests"
counted_test --workspace --all-features --doc

step "one build: the demo's build after the test command compiles nothing"
# The README promises that the demo command and this command share one build. Cargo unifies features
# per command, so a dependency feature that only the tests enable would rebuild RocksDB and librdkafka
# for the demo (workspace-hack/Cargo.toml pins them); this catches a new one.
rebuilt=$(cargo build -p processor-cli 2>&1 | grep -E '^ *Compiling ' || true)
if [ -n "$rebuilt" ]; then
  echo "the demo's build recompiled after the test command (add the differing features to workspace-hack):" >&2
  echo "$rebuilt" >&2
  exit 1
fi
