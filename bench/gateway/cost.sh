#!/usr/bin/env bash
# Instructions per request of Keel's gateway (plain route), counted by callgrind, so that
# changes to per-request work can be compared on a machine whose req/s is noisy; with the
# argument `nginx`, NGINX's on the same route doing the same work (bench/gateway/nginx.conf,
# one process: `master_process off`), with `nginx-bare` NGINX's without the forwarding
# headers and request id (nginx-bare.conf). Run through
# `scripts/bench gateway-cost [nginx|nginx-bare]`, which builds the release binaries first.
#
# The proxy runs single-threaded under `valgrind --tool=callgrind`; wrk warms it up,
# the counters are zeroed, wrk loads it for BENCH_DURATION (default 10s) with 8
# connections, the counters are dumped, and the dump's instruction total is divided by
# the requests wrk completed. Only user space is counted.
set -euo pipefail
cd "$(dirname "$0")/../.."

duration="${BENCH_DURATION:-10s}"
dir=$(mktemp -d /tmp/keel-bench-cost-XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
upstream_port=$(free_port)
listen_port=$(free_port)
admin_port=$(free_port)

target/release/upstream --listen "127.0.0.1:$upstream_port" >/dev/null &
pids+=($!)
cat > "$dir/keel.toml" <<TOML
[telemetry]
log_format = "json"
log_level = "warn"

[gateway]
listen = "127.0.0.1:$listen_port"
admin_listen = "127.0.0.1:$admin_port"

[[gateway.routes]]
name = "bench"
match = { path_prefix = "/" }
upstreams = ["http://127.0.0.1:$upstream_port"]
TOML
target="${1:-keel}"
# The tree the binary was built from, read before the run (it may change during one).
commit="$(git rev-parse --short HEAD)"
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit + uncommitted changes"
case "$target" in
  keel)
    TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
      target/release/keel --config "$dir/keel.toml" gateway >"$dir/valgrind.log" 2>&1 &
    ;;
  nginx | nginx-bare)
    nginx=$(command -v nginx || echo /usr/sbin/nginx)
    sed -e "s|{{DIR}}|$dir|g" -e "s|{{UPSTREAM}}|127.0.0.1:$upstream_port|" \
      -e "s|{{CONNECTIONS}}|8|" -e "s|{{LISTEN}}|127.0.0.1:$listen_port|" \
      -e "s|^worker_processes 1;|worker_processes 1;\nmaster_process off;|" \
      "bench/gateway/$target.conf" >"$dir/nginx.conf"
    valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
      "$nginx" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" >"$dir/valgrind.log" 2>&1 &
    ;;
  *) echo "unknown target: $target (keel, nginx or nginx-bare)" >&2; exit 2 ;;
esac
pids+=($!)
url="http://127.0.0.1:$listen_port/"
for _ in $(seq 1 120); do
  curl -sf -o /dev/null "$url" && break
  sleep 0.5
done
wrk -t1 -c8 -d1s "$url" >/dev/null
callgrind_control -z >/dev/null 2>&1
wrk -t1 -c8 -d"$duration" "$url" >"$dir/wrk.log"
callgrind_control -d >/dev/null 2>&1
sleep 1
# awk reads to the end (no early exit), so callgrind_annotate never meets a closed pipe.
instructions=$(callgrind_annotate "$dir"/callgrind.out.1 2>/dev/null \
  | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }')
requests=$(awk '/requests in/ && !done { print $1; done = 1 }' "$dir/wrk.log")
echo "date          $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "target        $target$([ "$target" = keel ] && echo " $commit")"
echo "requests      $requests (wrk -t1 -c8 -d$duration, under callgrind)"
echo "instructions  $instructions (user space, after warm-up)"
echo "per request   $((instructions / requests))"
