#!/usr/bin/env bash
# Client instructions per acquire+release pair, counted by valgrind's callgrind (stable on a noisy
# machine, unlike time): ours, the raw floor and the peers, on the same servers. Each client runs
# twice, with N1 and N2 sequential pairs; instructions per pair = (Ir(N2) - Ir(N1)) / (N2 - N1), so
# start-up (servers, connections, the runtime) cancels out. The servers are separate processes, not
# traced: only the client's instructions count.
#
#   benches/callgrind.sh                       # the default clients
#   benches/callgrind.sh "Redis ours" "Redis raw floor"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/build-env.sh >/dev/null
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }

N1=${N1:-200}
N2=${N2:-1200}
clients=("$@")
if [ ${#clients[@]} -eq 0 ]; then
  clients=("Redis raw floor" "Redis raw floor + fencing script" "Redis ours" "Redis rslock-1"
           "Redis async-redis-lock" "Redlock-3 raw floor" "Redlock-3 raw floor + fencing script"
           "Redlock-3 ours" "Redlock-3 rslock-3")
fi

bin=$(cargo bench -p benches --bench lockbench --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "lockbench" and m.get("executable"):
        print(m["executable"])')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

instructions() { # label pairs -> total Ir of the client process
  local file="$out/callgrind.$RANDOM"
  valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" --callgrind "$1" "$2" >/dev/null 2>&1
  awk '/^(summary|totals):/ {print $2; exit}' "$file"
}

printf '| client | instructions per pair |\n|---|---|\n'
for client in "${clients[@]}"; do
  a=$(instructions "$client" "$N1")
  b=$(instructions "$client" "$N2")
  printf '| %s | %s |\n' "$client" "$(( (b - a) / (N2 - N1) ))"
done
