#!/usr/bin/env bash
# End-to-end load on loopback: squire, HAProxy and nginx side by side, and the
# backends directly, all against the same backends, in one command:
#
#   benches/load.sh                  # about 15 minutes; REPS=1 DURATION=2 for a quick look
#   ONLY="tcp-bulk memory" TARGETS="nginx squire" benches/load.sh   # a subset
#
# Backends (benches/loadgen, `serve`): 3 TCP servers answering PING\r\n with
# +PONG\r\n, 3 HTTP/1.1 servers answering every request with a 128-byte body,
# and one bulk sink (reads and discards frames, acknowledging each: bulk is
# one direction, client to backend). Every proxy balances round robin over the
# same three backends (the sink alone for bulk):
#   direct   the load tool spreads its connections over the backends itself
#   haproxy  nbthread 1, tcp and http mode, http-reuse always
#   nginx    worker_processes 1, stream and http blocks, upstream keepalive
#   squire   agent.threads = 1, tcp and http listeners, the embedded (local)
#            registry, whose instance files this script writes itself
#
# Like-for-like: load tool, proxy and backends all run on one core
# (taskset -c $CORE), so throughput is CPU cost rather than cross-core
# wakeups, and each proxy's CPU time (utime + stime from /proc/PID/stat,
# nginx master + worker) over each measured window gives proxy CPU per
# operation, the steadiest figure. Latencies are exact percentiles: the load
# tool times and keeps every request (closed loop, one request in flight per
# connection).
#
# Workloads, each REPS times, targets in rotating order: TCP request/response
# on 1 and 50 connections, TCP churn (connect, one request, close; 50 at once,
# from source addresses 127.0.0.2-9), TCP bulk (one stream), HTTP/1.1
# keep-alive on 1 and 50 connections, HTTP churn (a new connection per
# request, 50 at once); then memory: a burst of BURST simultaneous connects,
# and RSS idle, holding IDLE_CONNS idle proxied TCP connections, and 2 s after
# they close.
#
# Prints a Markdown report (date, commit, machine, noise) and writes it to
# $OUT (default target/load-bench.md); the raw results go next to it
# ($OUT.tsv). Traffic stays on 127.0.0.0/8.
#
# Needs: haproxy, nginx with the stream module, taskset, curl, and root or a
# hard open-files limit of at least 2 * IDLE_CONNS + 1000
#   apt-get install -y haproxy nginx libnginx-mod-stream
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}       # measured seconds per run
WARMUP=${WARMUP:-1}           # unmeasured seconds before each
IDLE_CONNS=${IDLE_CONNS:-10000}
BURST=${BURST:-1000}
CORE=${CORE:-0}
OUT=${OUT:-target/load-bench.md}
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}

for tool in haproxy nginx taskset curl; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool: apt-get install -y haproxy nginx libnginx-mod-stream curl" >&2; exit 1; }
done
# Each idle proxied connection costs the proxy two descriptors.
ulimit -Hn $((2 * IDLE_CONNS + 1000)) 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FILES=$(ulimit -n); [ "$FILES" = unlimited ] && FILES=1048576
if [ $((2 * IDLE_CONNS + 1000)) -gt "$FILES" ]; then
  IDLE_CONNS=$(( (FILES - 1000) / 2 ))
  echo "open-files limit $FILES (cannot raise the hard limit here): holding $IDLE_CONNS idle connections" >&2
fi
PROXY_MAXCONN=$(( (FILES - 200) / 2 ))
echo "building squire and the load tool..." >&2
cargo build --release --quiet --bin squire
cargo build --release --quiet --manifest-path benches/loadgen/Cargo.toml --target-dir target/loadgen
SQUIRE=${SQUIRE:-$PWD/target/release/squire} # another build to compare: SQUIRE=path
LG=$PWD/target/loadgen/release/squire-loadgen
# For foreground runs only: a function run in the background is a subshell,
# and its $! is not the program's pid (so background starts call taskset).
pin() { taskset -c "$CORE" "$@"; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
started=$(date +%s)

# Ports: 3 tcp, 3 http, sink, then tcp/http/bulk for each proxy, squire's admin.
mapfile -t P < <("$LG" ports 17)
tcp=("${P[@]:0:3}"); http=("${P[@]:3:3}"); sink=${P[6]}
hap=("${P[@]:7:3}"); ngx=("${P[@]:10:3}"); sq=("${P[@]:13:3}"); sq_admin=${P[16]}
list() { local IFS=,; echo "${*/#/127.0.0.1:}"; }

for i in 0 1 2; do
  extra=(); [ "$i" = 0 ] && extra=(--sink "127.0.0.1:$sink")
  taskset -c "$CORE" "$LG" serve --tcp "127.0.0.1:${tcp[$i]}" --http "127.0.0.1:${http[$i]}" "${extra[@]}" \
    --max-secs 3600 2>>"$work/backends.log" & pids+=($!)
done
"$LG" wait "$(list "${tcp[@]}" "${http[@]}" "$sink")"

# squire: discovery reads instance files we write ourselves (the local
# registry's format: {dir}/{service}/{id}.json, valid for a day).
expires=$(( $(date +%s%3N) + 86400000 ))
announce() { # service id port
  mkdir -p "$work/registry/$1"
  printf '{"expires_at_ms":%s,"instance":{"name":"%s","id":"%s","host":"127.0.0.1","port":%s,"tags":[],"metadata":{},"version":"1.0.0","weight":100,"status":"healthy"}}' \
    "$expires" "$1" "$2" "$3" > "$work/registry/$1/$2.json"
}
for i in 0 1 2; do announce bench-tcp "b$i" "${tcp[$i]}"; announce bench-http "b$i" "${http[$i]}"; done
announce bench-bulk sink "$sink"
cat > "$work/squire.toml" <<TOML
[agent]
admin = "127.0.0.1:$sq_admin"
log = "warn"
threads = 1
drain_delay = "0s"
drain_timeout = "1s"
[registry]
kind = "local"
dir = "$work/registry"
[[upstream]]
service = "bench-tcp"
listen = "127.0.0.1:${sq[0]}"
strategy = "round_robin"
[[upstream]]
service = "bench-http"
listen = "127.0.0.1:${sq[1]}"
protocol = "http"
strategy = "round_robin"
[[upstream]]
service = "bench-bulk"
listen = "127.0.0.1:${sq[2]}"
TOML
taskset -c "$CORE" "$SQUIRE" run -c "$work/squire.toml" 2>"$work/squire.log" & squire_pid=$!; pids+=($squire_pid)

cat > "$work/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn $PROXY_MAXCONN
defaults
  maxconn $PROXY_MAXCONN
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend tcp_in
  mode tcp
  bind 127.0.0.1:${hap[0]}
  default_backend tcp_pool
backend tcp_pool
  mode tcp
  balance roundrobin
$(for i in 0 1 2; do echo "  server b$i 127.0.0.1:${tcp[$i]}"; done)
frontend http_in
  mode http
  bind 127.0.0.1:${hap[1]}
  default_backend http_pool
backend http_pool
  mode http
  balance roundrobin
  http-reuse always
$(for i in 0 1 2; do echo "  server b$i 127.0.0.1:${http[$i]}"; done)
frontend bulk_in
  mode tcp
  bind 127.0.0.1:${hap[2]}
  default_backend bulk_pool
backend bulk_pool
  mode tcp
  server sink 127.0.0.1:$sink
CFG
taskset -c "$CORE" haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" & haproxy_pid=$!; pids+=($haproxy_pid)

mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CFG
$([ -f "$NGINX_STREAM_MODULE" ] && echo "load_module $NGINX_STREAM_MODULE;")
worker_processes 1;
worker_rlimit_nofile $FILES;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections $((FILES - 100)); }
stream {
  upstream tcp_pool { $(for i in 0 1 2; do echo -n "server 127.0.0.1:${tcp[$i]}; "; done) }
  upstream bulk_pool { server 127.0.0.1:$sink; }
  server { listen 127.0.0.1:${ngx[0]}; proxy_pass tcp_pool; }
  server { listen 127.0.0.1:${ngx[2]}; proxy_pass bulk_pool; }
}
http {
  access_log off;
  keepalive_requests 100000000;
  upstream http_pool {
    $(for i in 0 1 2; do echo -n "server 127.0.0.1:${http[$i]}; "; done)
    keepalive 64;
    keepalive_requests 100000000;
  }
  server {
    listen 127.0.0.1:${ngx[1]};
    location / {
      proxy_pass http://http_pool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CFG
taskset -c "$CORE" nginx -p "$work/nginx/" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" & nginx_pid=$!; pids+=($nginx_pid)

"$LG" wait "$(list "${hap[@]}" "${ngx[@]}" "${sq[@]}")" || {
  tail -n 20 "$work"/*.log "$work/nginx/error.log" >&2; exit 1; }
for _ in $(seq 1 100); do # squire's discovery: 3 + 3 + 1 endpoints
  n=$(curl -fsS "http://127.0.0.1:$sq_admin/v1/services" 2>/dev/null \
      | grep -o '"port":[0-9]*' | sort -u | wc -l || true)
  [ "$n" -ge 7 ] && break; sleep 0.1
done
[ "$n" -ge 7 ] || { echo "squire discovered $n of the 7 backends" >&2; exit 1; }
nginx_pids="$nginx_pid,$(pgrep -P "$nginx_pid" | paste -sd,)"

# target kind -> "addresses pids"
where() {
  case "$1" in
    direct)  case "$2" in tcp) list "${tcp[@]}";; http) list "${http[@]}";; bulk) list "$sink";; esac ;;
    haproxy) case "$2" in tcp) list "${hap[0]}";; http) list "${hap[1]}";; bulk) list "${hap[2]}";; esac ;;
    nginx)   case "$2" in tcp) list "${ngx[0]}";; http) list "${ngx[1]}";; bulk) list "${ngx[2]}";; esac ;;
    squire)  case "$2" in tcp) list "${sq[0]}";; http) list "${sq[1]}";; bulk) list "${sq[2]}";; esac ;;
  esac
}
pids_of() { case "$1" in direct) echo "";; haproxy) echo "$haproxy_pid";; nginx) echo "$nginx_pids";; squire) echo "$squire_pid";; esac; }

mkdir -p "$(dirname "$OUT")"
results=$OUT.tsv
: > "$results"
meta() { printf 'meta\t%s\t-\t%s\n' "$1" "$2" >> "$results"; }
dirty=$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo " (src modified)")
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta commit "$(git rev-parse --short HEAD)$dirty"
meta machine "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), Linux $(uname -r)"
meta versions "$(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), squire $(git rev-parse --short HEAD)"
meta setup "everything on core $CORE; REPS=$REPS, DURATION=${DURATION}s measured after ${WARMUP}s warm-up; medians over the repetitions"
meta "load average at start" "$(cut -d' ' -f1-3 /proc/loadavg)"
calibrate() { for _ in 1 2 3 4 5; do printf 'calib\t-\t-\t%s\n' "$(pin "$LG" calib)" >> "$results"; done; }
calibrate
for t in haproxy nginx squire; do
  printf 'idle\t%s\t-\t%s\n' "$t" "$("$LG" idle --pids "$(pids_of "$t")" --secs 3)" >> "$results"
done

read -r -a targets <<<"${TARGETS:-direct haproxy nginx squire}"
nt=${#targets[@]}
workloads=("tcp-1 tcp tcp 1" "tcp-50 tcp tcp 50" "tcp-churn tcp-churn tcp 50" "tcp-bulk bulk bulk 1"
           "http-1 http http 1" "http-50 http http 50" "http-churn http-churn http 50")
for rep in $(seq 1 "$REPS"); do
  for w in "${workloads[@]}"; do
    read -r label workload kind conns <<<"$w"
    [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $label "* ]] && continue
    for k in $(seq 0 $((nt - 1))); do
      t=${targets[$(( (k + rep) % nt ))]}
      if line=$(pin "$LG" run --workload "$workload" --targets "$(where "$t" "$kind")" --conns "$conns" \
                  --warmup "$WARMUP" --duration "$DURATION" --pids "$(pids_of "$t")"); then
        printf '%s\t%s\t%s\t%s\n' "$label" "$t" "$rep" "$line" >> "$results"
        echo "[$rep/$REPS] $label $t: $line" >&2
      else
        echo "[$rep/$REPS] $label $t: FAILED" >&2
      fi
    done
  done
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" memory "* ]] && continue
  for k in $(seq 0 $((nt - 1))); do
    t=${targets[$(( (k + rep) % nt ))]}
    [ "$t" = direct ] && continue
    if line=$(pin "$LG" hold --targets "$(where "$t" tcp)" --conns "$IDLE_CONNS" --burst "$BURST" \
                --pids "$(pids_of "$t")"); then
      printf 'memory\t%s\t%s\t%s\n' "$t" "$rep" "$line" >> "$results"
      echo "[$rep/$REPS] memory $t: $line" >&2
    else
      echo "[$rep/$REPS] memory $t: FAILED" >&2
    fi
  done
done

calibrate
meta "load average at end" "$(cut -d' ' -f1-3 /proc/loadavg)"
meta "wall time" "$(( $(date +%s) - started )) s"
"$LG" report "$results" | tee "$OUT"
echo "written to $OUT (raw results: $results)" >&2
