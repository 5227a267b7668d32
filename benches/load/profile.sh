#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable (same binary, same inputs,
# same count, whatever else the machine does), unlike timings on this VM, and with no hardware
# counters needed (`perf` here only has cpu-clock).
#
#   bash benches/load/profile.sh [h1|h2c] [N]
#   TIER='{ requests_per_second: 1000000000, burst: 1000000000, tokens_per_minute: 1000000000000 }' \
#     bash benches/load/profile.sh h1      # the same with another tier (token limits, say)
#   EXTRA='rate_limits: { backend: redis, redis: { url_env: TG_REDIS_URL } }' TG_REDIS_URL=redis://127.0.0.1:PORT \
#     bash benches/load/profile.sh h1      # more config (here: limits in a redis-server of your own)
#
# Builds tollgate and the load upstream, then for the benchmarked route with a key and the same
# route public (no key check, no limits): N requests (4,000 by default) after 2,000 of warm-up,
# instrumented only around the measured ones. Prints instructions per request for each and
# leaves the callgrind files in the printed directory, for
#   callgrind_annotate --inclusive=yes --auto=no <dir>/keyed/callgrind.out.*
# Needs valgrind, h2load (nghttp2-client), curl.
set -euo pipefail
protocol=${1:-h1}
n=${2:-4000}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release --locked --bin tollgate --example load-upstream >&2
dir=$(mktemp -d /tmp/tollgate-profile.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port)
taskset -c 0 target/release/examples/load-upstream "127.0.0.1:$up" >/dev/null 2>&1 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT

config() { # name port admin extra
  cat > "$dir/$1.yaml" <<YAML
listen: 127.0.0.1:$2
admin_listen: 127.0.0.1:$3
upstream: { url: "http://127.0.0.1:$up" }
store: { sqlite: "$dir/keys.db" }
log: { format: json, level: warn }
tiers: { bench: ${TIER:-{ requests_per_second: 1000000000, burst: 1000000000 \}} }
$4
${EXTRA:-}
YAML
}
echo '{"model":"m","messages":[{"role":"user","content":"hi"}]}' > "$dir/body.json"
flags=(--h1 -c 8)
[ "$protocol" = h2c ] && flags=(-c 4 -m 8)

for variant in keyed public; do
  port=$(free_port); admin=$(free_port)
  extra=""
  [ $variant = public ] && extra=$'routes:\n  - { method: POST, path: /v1/chat/completions, public: true }'
  config $variant "$port" "$admin" "$extra"
  [ -f "$dir/key" ] || target/release/tollgate keys --config "$dir/keyed.yaml" create --org bench --tier bench \
      --scope inference:read --scope inference:write | head -1 > "$dir/key"
  mkdir -p "$dir/$variant"
  taskset -c 1 valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file="$dir/$variant/callgrind.out.%p" \
      target/release/tollgate serve --config "$dir/$variant.yaml" >/dev/null 2>"$dir/$variant/valgrind.log" &
  vg=$!
  for _ in $(seq 1 120); do curl -fs -o /dev/null "http://127.0.0.1:$admin/healthz" && break; sleep 0.5; done
  load() {
    taskset -c 0 h2load "${flags[@]}" -n "$1" -d "$dir/body.json" -H "authorization: Bearer $(cat "$dir/key")" \
        -H 'content-type: application/json' "http://127.0.0.1:$port/v1/chat/completions" | grep -E "^status codes"
  }
  # A key changed in the last 2 s is re-read by the revocation poll (its overlap window), which
  # would drop it from the cache once: let that pass before the warm-up.
  sleep 3
  load 2000 >/dev/null
  callgrind_control -i on $vg >/dev/null 2>&1
  codes=$(load "$n")
  callgrind_control -i off $vg >/dev/null 2>&1
  callgrind_control -d $vg >/dev/null 2>&1
  sleep 1
  kill $vg; wait $vg 2>/dev/null || true
  total=$(cat "$dir/$variant"/callgrind.out.* | awk '/^totals:/ {s += $2} END {print s}')
  echo "$protocol $variant: $((total / n)) instructions per request ($codes)"
done
echo "callgrind files: $dir"
