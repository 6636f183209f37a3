# Sourced by scripts/test.sh: the published packages, checked as a user gets them.
#
# `cargo package` makes the `.crate` files of the library crates (fenced-state, fenced-processor), and a
# crate outside the workspace (packaging/consumer) that depends on them exactly as a user writes it is
# built from those files — unpacked into `target/packaged/` and patched in with `--config`, never from
# the repository's folders — without default features and with them, then run: a lock on the in-process
# backend, one on a throwaway redis-server, a tiny job through `PartitionProcessor`. A file a package
# misses (a Lua script, the dashboard) fails the build here.

PUBLISHED_PACKAGES=(fenced-state fenced-processor)

# The packages' version and the build directory (resolved through the ./target link), on one line.
version_and_target() {
  cargo metadata --no-deps --format-version 1 | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
version = next(p["version"] for p in meta["packages"] if p["name"] == "fenced-state")
print(version, os.path.realpath(meta["target_directory"]))'
}

# A free loopback port (the kernel picks it).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

check_packages() {
  local version scratch target crate patches=() port redis_pid status=0
  read -r version target < <(version_and_target)
  # --allow-dirty: a developer runs this with uncommitted changes too (it only records the commit).
  # --no-verify: the consumer's build below is the verification, from the packaged files.
  cargo package --no-verify --allow-dirty $(printf -- '-p %s ' "${PUBLISHED_PACKAGES[@]}")
  # One fixed place in the build directory (emptied each run): the same paths give the same build
  # hashes, so runs reuse each other's build instead of piling up copies.
  scratch="$target/packaged"
  rm -rf "$scratch"
  mkdir -p "$scratch"
  for crate in "${PUBLISHED_PACKAGES[@]}"; do
    tar -xzf "$target/package/$crate-$version.crate" -C "$scratch"
    patches+=(--config "patch.crates-io.$crate.path='$scratch/$crate-$version'")
    printf '    %-18s %8s bytes packed, %s files\n' "$crate" \
      "$(stat -c %s "$target/package/$crate-$version.crate")" "$(find "$scratch/$crate-$version" -type f | wc -l)"
  done
  cp -r packaging/consumer "$scratch/consumer"
  # The versions this workspace is tested with (cargo drops the entries the consumer does not use).
  cp Cargo.lock "$scratch/consumer/Cargo.lock"
  (
    cd "$scratch/consumer"
    # The workspace's build directory: each dependency the consumer resolves as the workspace does
    # (same version, features and profile) is reused, not built again.
    export CARGO_TARGET_DIR="$target"
    cargo build -q --no-default-features "${patches[@]}"
    "$CARGO_TARGET_DIR/debug/consumer"
    cargo build -q "${patches[@]}"
  ) || status=$?
  if [ "$status" -eq 0 ]; then
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$scratch/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    REDIS_URL="redis://127.0.0.1:$port" "$target/debug/consumer" || status=$?
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  return "$status"
}

# The packages' `rust-version` is at least every dependency's own (what cargo would refuse to build
# with an older compiler): a dependency upgrade that raises the floor fails here, naming it. (The floor
# itself was checked by building with that toolchain: `cargo +1.94 check -p fenced-processor`.)
check_rust_version() {
  cargo metadata --format-version 1 --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
    python3 -c '
import json, sys
meta = json.load(sys.stdin)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
version = lambda text: tuple(int(part) for part in (text.split(".") + ["0", "0"])[:3])
failed = False
for name in sys.argv[1:]:
    root = next(i for i, p in packages.items() if p["name"] == name)
    ours = version(packages[root]["rust_version"])
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo += [d["pkg"] for d in nodes[node]["deps"]
                 if any(k["kind"] in (None, "build") for k in d["dep_kinds"])]
    needs = max((version(packages[i]["rust_version"]), packages[i]["name"] + " " + packages[i]["version"])
                for i in seen if packages[i]["rust_version"])
    declared, floor = packages[root]["rust_version"], ".".join(map(str, needs[0]))
    print(f"    {name}: rust-version {declared}; the highest its dependencies declare: {floor} ({needs[1]})")
    if needs[0] > ours:
        print(f"{name} declares rust-version {declared} but {needs[1]} needs {floor}", file=sys.stderr)
        failed = True
sys.exit(1 if failed else 0)
' "${PUBLISHED_PACKAGES[@]}"
}
