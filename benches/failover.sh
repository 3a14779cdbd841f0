#!/usr/bin/env bash
# Failover with real processes: one of three game servers dies (kill -9)
# under steady connection load through a gate squire, in one command:
#
#   benches/failover.sh              # about 2 minutes; REPS=1 for a quick look
#
# Each run starts, on free loopback ports and in a temporary directory:
#   - a real etcd (Debian's etcd-server),
#   - three game servers (benches/loadgen `serve --name battle-N`: TCP,
#     answering PING\r\n with +PONG battle-N\r\n, so a client knows which one
#     answered), each with its own `squire run` that registers it as service
#     `battle` in etcd under a lease of TTL and checks it with a TCP connect
#     every INTERVAL (unhealthy after FALL failures in a row),
#   - a gate `squire run` with a TCP listener over `battle`: round robin,
#     retries = RETRIES, passive ejection after EJECT_FAILURES consecutive
#     connect failures for EJECT_TIME.
# Once the gate sees the three healthy, `squire-loadgen failover` starts RATE
# connections a second through the gate (at most CONNS in flight; each
# connect, one PING, the named reply, close), polls the gate's /metrics every
# POLL_MS, and after BEFORE seconds SIGKILLs, depending on the scenario:
#   server  the game server only: its squire runs on, its health check fails
#           and it announces the instance unhealthy;
#   host    the game server and its squire: nothing announces anything, the
#           instance goes when its lease expires (TTL).
# The load runs on for AFTER seconds, then everything of the run is stopped.
# The victim rotates over battle-1..3. Each scenario runs REPS times, every
# run on a fresh etcd and fresh processes (no ejection state carried over).
#
# Per run: client connections failed (those started after the kill, which
# retries should save, apart from those in flight at the kill, which nothing
# can: their server died under them; SIGKILL is asynchronous, so "in flight"
# runs until the server process has exited, 0.1-5 ms later, gone_us); connect attempts the gate still made
# to the dead instance and the last one's time (the gate's
# squire_upstream_picks_total for it stops growing: passive ejection); when
# the gate ejected it (squire_upstream_ejected_endpoints); when the gate's
# discovery stopped listing it healthy (squire_endpoints{status="healthy"}),
# and when it dropped it altogether. Times are from the kill to the scrape
# that first showed the change: upper bounds within one poll interval.
#
# Prints a Markdown report (date, commit, machine, settings; medians and
# min-max over the runs) and writes it to $OUT (default
# target/failover-bench.md), the raw results to $OUT.tsv. Traffic stays on
# 127.0.0.0/8. Needs etcd (apt-get install -y etcd-server) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-server host}
RATE=${RATE:-500}             # connections started per second
CONNS=${CONNS:-32}            # in flight at most
BEFORE=${BEFORE:-2}           # seconds of load before the kill
AFTER=${AFTER:-6}             # and after it
POLL_MS=${POLL_MS:-5}         # the gate's /metrics scraped this often
INTERVAL=${INTERVAL:-1s}      # game squires: [[service.check]] interval
CHECK_TIMEOUT=${CHECK_TIMEOUT:-500ms}
RISE=${RISE:-2}
FALL=${FALL:-2}
TTL=${TTL:-3s}                # game squires: [registry] ttl (etcd lease)
RETRIES=${RETRIES:-2}         # gate: [[upstream]] retries
EJECT_FAILURES=${EJECT_FAILURES:-3}  # gate: [upstream.ejection] consecutive_failures
EJECT_TIME=${EJECT_TIME:-10s}        # gate: [upstream.ejection] base_time
OUT=${OUT:-target/failover-bench.md}
DEADLINE=${DEADLINE:-30}      # seconds any setup step may take

for tool in etcd curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y etcd-server curl" >&2; exit 1; }
done
echo "building squire and the load tool..." >&2
[ -n "${SQUIRE:-}" ] || cargo build --release --quiet --bin squire
cargo build --release --quiet --manifest-path benches/loadgen/Cargo.toml --target-dir target/loadgen
SQUIRE=${SQUIRE:-$PWD/target/release/squire} # another build to compare: SQUIRE=path
LG=$PWD/target/loadgen/release/squire-loadgen

work=$(mktemp -d)
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
started=$(date +%s)

# Runs "$@" until it succeeds, every 50 ms, for at most DEADLINE seconds.
wait_for() {
  local what=$1; shift
  local deadline=$(( $(date +%s) + DEADLINE ))
  until "$@" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "timed out after ${DEADLINE}s waiting for $what" >&2; return 1
    fi
    sleep 0.05
  done
}
etcd_healthy() { curl -fsS "http://127.0.0.1:$1/health" | grep -q '"health":"true"'; }
# The gate's count of healthy battle instances.
healthy_count() {
  curl -fsS "http://127.0.0.1:$1/metrics" \
    | grep '^squire_endpoints{' | grep 'service="battle"' | grep 'status="healthy"' | awk '{print $2}'
}
gate_sees() { [ "$(healthy_count "$1")" = "$2" ]; }

# One run: a fresh cluster, the kill, the figures appended to $results.
run_once() { # scenario rep
  local scenario=$1 rep=$2 dir=$work/$1-$2
  mkdir -p "$dir"
  local P; mapfile -t P < <("$LG" ports 10)
  local etcd_client=${P[0]} etcd_peer=${P[1]} game=("${P[@]:2:3}") admin=("${P[@]:5:3}")
  local gate_admin=${P[8]} gate=${P[9]}
  local endpoint=http://127.0.0.1:$etcd_client

  etcd --name bench --data-dir "$dir/etcd" \
    --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "bench=http://127.0.0.1:$etcd_peer" \
    --logger zap --log-level warn >/dev/null 2>"$dir/etcd.log" & pids+=($!)
  wait_for "etcd on $etcd_client" etcd_healthy "$etcd_client" || { tail -n 5 "$dir/etcd.log" >&2; stop_all; return 1; }

  local server_pid=() squire_pid=() i
  for i in 0 1 2; do
    local id=battle-$((i + 1))
    "$LG" serve --tcp "127.0.0.1:${game[$i]}" --name "$id" --max-secs 600 2>"$dir/$id.log" &
    server_pid+=($!); pids+=($!)
    cat > "$dir/$id.toml" <<TOML
[agent]
admin = "127.0.0.1:${admin[$i]}"
state_dir = "$dir/state-$id"
drain_delay = "0s"
[registry]
kind = "etcd"
endpoints = ["$endpoint"]
ttl = "$TTL"
[service]
name = "battle"
id = "$id"
host = "127.0.0.1"
port = ${game[$i]}
[[service.check]]
kind = "tcp"
interval = "$INTERVAL"
timeout = "$CHECK_TIMEOUT"
rise = $RISE
fall = $FALL
TOML
    "$SQUIRE" run -c "$dir/$id.toml" 2>"$dir/squire-$id.log" & squire_pid+=($!); pids+=($!)
  done
  cat > "$dir/gate.toml" <<TOML
[agent]
admin = "127.0.0.1:$gate_admin"
state_dir = "$dir/state-gate"
drain_delay = "0s"
[registry]
kind = "etcd"
endpoints = ["$endpoint"]
ttl = "$TTL"
[[upstream]]
service = "battle"
listen = "127.0.0.1:$gate"
strategy = "round_robin"
connect_timeout = "1s"
retries = $RETRIES
retry_backoff = "10ms"
[upstream.ejection]
consecutive_failures = $EJECT_FAILURES
base_time = "$EJECT_TIME"
TOML
  "$SQUIRE" run -c "$dir/gate.toml" 2>"$dir/squire-gate.log" & pids+=($!)
  if ! wait_for "the gate to see 3 healthy battle instances" gate_sees "$gate_admin" 3; then
    tail -n 5 "$dir"/*.log >&2; stop_all; return 1
  fi

  local v=$(( (rep - 1) % 3 )) kill
  case "$scenario" in
    server) kill=${server_pid[$v]} ;;
    host)   kill=${squire_pid[$v]},${server_pid[$v]} ;;
  esac
  local line
  if line=$("$LG" failover --target "127.0.0.1:$gate" --admin "127.0.0.1:$gate_admin" \
              --service battle --victim "battle-$((v + 1))" --kill "$kill" \
              --rate "$RATE" --conns "$CONNS" --before "$BEFORE" --after "$AFTER" --poll-ms "$POLL_MS"); then
    printf '%s\t%s\t%s\n' "$scenario" "$rep" "$line" >> "$results"
    echo "[$rep/$REPS] $scenario battle-$((v + 1)): $line" >&2
    if [[ " $line " != *" failed_after=0 "* ]]; then # keep the logs of a run that failed clients
      mkdir -p "$OUT.logs/$scenario-$rep" && cp "$dir"/*.log "$dir"/*.toml "$OUT.logs/$scenario-$rep/"
      echo "  its logs: $OUT.logs/$scenario-$rep" >&2
    fi
  else
    echo "[$rep/$REPS] $scenario: FAILED" >&2
    tail -n 5 "$dir"/*.log >&2
  fi
  stop_all
  rm -rf "$dir"
}

mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT.logs"
results=$OUT.tsv
: > "$results"
meta() { printf 'meta\t%s\t%s\n' "$1" "$2" >> "$results"; }
dirty=$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo " (src modified)")
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta commit "$(git rev-parse --short HEAD)$dirty"
meta machine "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), Linux $(uname -r), CPUs allowed: $(taskset -pc $$ | cut -d: -f2 | xargs)"
meta versions "$("$SQUIRE" --version | head -1), etcd $(etcd --version | head -1 | awk '{print $NF}')"
meta load "$RATE connections/s through the gate (connect, PING, reply, close), at most $CONNS in flight; kill after ${BEFORE}s, load for ${AFTER}s after; /metrics polled every ${POLL_MS} ms"
meta "game squires" "TCP check interval $INTERVAL, timeout $CHECK_TIMEOUT, rise $RISE, fall $FALL; etcd lease ttl $TTL (refreshed every ttl/3)"
meta gate "round_robin, retries $RETRIES (retry_backoff 10ms), connect_timeout 1s, ejection after $EJECT_FAILURES consecutive failures for $EJECT_TIME"
meta "load average at start" "$(cut -d' ' -f1-3 /proc/loadavg)"

for rep in $(seq 1 "$REPS"); do
  for scenario in $SCENARIOS; do
    run_once "$scenario" "$rep" || echo "[$rep/$REPS] $scenario: could not set up" >&2
  done
done

meta "load average at end" "$(cut -d' ' -f1-3 /proc/loadavg)"
meta "wall time" "$(( $(date +%s) - started )) s"
"$LG" failover-report "$results" | tee "$OUT"
echo "written to $OUT (raw results: $results)" >&2
