#!/usr/bin/env bash
# End-to-end load on loopback, side by side in one run: wrk against
#   direct   one backend, no proxy
#   squire   squire's HTTP listener (and its TCP listener) over 3 backends
#   haproxy  HAProxy in http mode (and tcp mode) over the same 3 backends
# and prints requests/s and latency percentiles, with ratios to HAProxy.
#
# Like-for-like: wrk, the proxy under test and the backends all run on one
# core (taskset -c 0), HAProxy with nbthread 1, squire with one worker
# thread; throughput is then CPU cost per request. A wakeup across the two
# vCPUs of these machines costs about 30 us and would hide the proxies' own
# cost. The three idle squires that announce the backends run on core 1.
#
# Needs: wrk, haproxy, taskset, curl (apt-get install -y wrk haproxy curl).
# Usage: benches/load-vs-haproxy.sh            (DURATION=10s by default)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
for tool in wrk haproxy taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y wrk haproxy curl" >&2; exit 1; }
done

cargo build --release --quiet --bin squire --example http_backend
SQUIRE=target/release/squire
BACKEND=target/release/examples/http_backend

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # url, what
  for _ in $(seq 1 200); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "timed out waiting for $2" >&2; exit 1
}

backends=()
for i in 1 2 3; do
  p=$(port); backends+=("$p")
  taskset -c 0 "$BACKEND" "127.0.0.1:$p" "b$i" 2>/dev/null & pids+=($!)
  # Each backend is announced by its own squire, as in production.
  cat > "$work/announce$i.toml" <<TOML
[agent]
admin = "127.0.0.1:$(port)"
threads = 1
[registry]
dir = "$work/registry"
[service]
name = "bench"
id = "bench-$i"
host = "127.0.0.1"
port = $p
TOML
  taskset -c 1 "$SQUIRE" run -c "$work/announce$i.toml" 2>/dev/null & pids+=($!)
done
for p in "${backends[@]}"; do wait_for "http://127.0.0.1:$p/" "backend $p"; done

squire_admin=$(port); squire_http=$(port); squire_tcp=$(port)
cat > "$work/squire.toml" <<TOML
[agent]
admin = "127.0.0.1:$squire_admin"
log = "warn"
threads = 1
[registry]
dir = "$work/registry"
[[upstream]]
service = "bench"
listen = "127.0.0.1:$squire_http"
protocol = "http"
strategy = "round_robin"
[[upstream]]
service = "bench"
listen = "127.0.0.1:$squire_tcp"
protocol = "tcp"
strategy = "round_robin"
TOML
taskset -c 0 "$SQUIRE" run -c "$work/squire.toml" & pids+=($!)
for _ in $(seq 1 200); do
  n=$(curl -fsS "http://127.0.0.1:$squire_admin/v1/services" 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["upstreams"][0]["endpoints"]))' 2>/dev/null || echo 0)
  [ "$n" = 3 ] && break; sleep 0.05
done
[ "$n" = 3 ] || { echo "squire did not discover the 3 backends" >&2; exit 1; }

haproxy_http=$(port); haproxy_tcp=$(port)
{
  echo "global"
  echo "  nbthread 1"
  echo "  maxconn 4096"
  echo "defaults"
  echo "  timeout connect 1s"
  echo "  timeout client 30s"
  echo "  timeout server 30s"
  echo "frontend http_in"
  echo "  mode http"
  echo "  bind 127.0.0.1:$haproxy_http"
  echo "  default_backend http_pool"
  echo "backend http_pool"
  echo "  mode http"
  echo "  balance roundrobin"
  echo "  http-reuse always"
  for i in 0 1 2; do echo "  server b$i 127.0.0.1:${backends[$i]}"; done
  echo "frontend tcp_in"
  echo "  mode tcp"
  echo "  bind 127.0.0.1:$haproxy_tcp"
  echo "  default_backend tcp_pool"
  echo "backend tcp_pool"
  echo "  mode tcp"
  echo "  balance roundrobin"
  for i in 0 1 2; do echo "  server b$i 127.0.0.1:${backends[$i]}"; done
} > "$work/haproxy.cfg"
taskset -c 0 haproxy -f "$work/haproxy.cfg" -db & pids+=($!)
wait_for "http://127.0.0.1:$haproxy_http/" "haproxy"
wait_for "http://127.0.0.1:$squire_http/" "squire"

# wrk output -> "requests/s p50 p90 p99" (latencies in microseconds)
measure() { # port connections
  taskset -c 0 wrk -t1 -c"$2" -d"$DURATION" --latency "http://127.0.0.1:$1/" | python3 -c '
import re, sys
text = sys.stdin.read()
def us(v):
    n, unit = float(re.match(r"[\d.]+", v).group()), re.sub(r"[\d.]+", "", v)
    return n * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p = {k: us(v) for k, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", text, re.M)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
line = "%.0f %.0f %.0f %.0f" % (rps, p["50"], p["90"], p["99"])
print(line + (" ERRORS:" + errors.group(0).replace(" ", "_") if errors else ""))
'
}

echo
echo "$(date -u +%Y-%m-%d) commit $(git rev-parse --short HEAD), DURATION=$DURATION, all on core 0"
printf '%-14s %5s %10s %9s %9s %9s %10s %10s\n' target conns "req/s" "p50 us" "p90 us" "p99 us" "rps/HAP" "p99/HAP"
for conns in 50 1; do
  for mode in http tcp; do
    if [ "$mode" = http ]; then hap=$haproxy_http; sq=$squire_http; else hap=$haproxy_tcp; sq=$squire_tcp; fi
    read -r h_rps h50 h90 h99 h_err < <(measure "$hap" "$conns")
    read -r s_rps s50 s90 s99 s_err < <(measure "$sq" "$conns")
    [ -z "$h_err$s_err" ] || echo "WARNING: haproxy-$mode $h_err squire-$mode $s_err" >&2
    if [ "$mode" = http ]; then
      read -r d_rps d50 d90 d99 d_err < <(measure "${backends[0]}" "$conns")
      [ -z "$d_err" ] || echo "WARNING: direct $d_err" >&2
      printf '%-14s %5s %10s %9s %9s %9s %10s %10s\n' "direct" "$conns" "$d_rps" "$d50" "$d90" "$d99" \
        "$(python3 -c "print(f'{$d_rps/$h_rps:.2f}')")" "$(python3 -c "print(f'{$d99/$h99:.2f}')")"
    fi
    printf '%-14s %5s %10s %9s %9s %9s %10s %10s\n' "haproxy-$mode" "$conns" "$h_rps" "$h50" "$h90" "$h99" "1.00" "1.00"
    printf '%-14s %5s %10s %9s %9s %9s %10s %10s\n' "squire-$mode" "$conns" "$s_rps" "$s50" "$s90" "$s99" \
      "$(python3 -c "print(f'{$s_rps/$h_rps:.2f}')")" "$(python3 -c "print(f'{$s99/$h99:.2f}')")"
  done
done
