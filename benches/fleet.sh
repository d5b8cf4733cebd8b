#!/usr/bin/env bash
# The fleet scenarios of issue 7, bounded in time, on this machine:
#
#   A. connect + idle: N devices ramp up at RATE/s, then stay idle (25 s
#      keepalives, a rekey every 120 s as kernel and wireguard-go peers do)
#      for IDLE seconds, long enough for every device's rekey: memory per
#      connected device and idle CPU, rekeys included.
#   B. storm + restart: N devices all at once; once all are connected the
#      gateway is stopped and started again (same data, same port): time to
#      all connected, CPU per handshake, time until all are back.
#   C. side by side: the same storm of N_WG devices against cloudlink and
#      against Debian's wireguard-go (TUN in a network namespace the script
#      creates, veth in 198.18.0.0/15): time to all connected, CPU per
#      handshake, memory per peer. cloudlink takes the storm twice: from
#      boringtun-style initiators (the upper 24 bits of the sender index
#      kept for the life of a tunnel) and with --random-index (a new
#      random index per handshake, as kernel and wireguard-go peers).
#
# Prints the figures and writes them (JSON, timelines, and the plot
# storm.png) under $OUT. Everything runs on loopback or inside the
# namespace; every run stops by itself (loadgen --duration).
#
# Usage: bash benches/fleet.sh            (N=100000, N_WG=50000)
#        N=20000 N_WG=10000 bash benches/fleet.sh   (a quicker look)
#        N=250000 SCENARIOS=A OUT=target/fleet250k bash benches/fleet.sh
#        (LG_THREADS: loadgen threads, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100000}
N_WG=${N_WG:-50000}
RATE=${RATE:-2500}
IDLE=${IDLE:-150}
OUT=${OUT:-target/fleet}
SCENARIOS=${SCENARIOS:-ABC}
LG_THREADS=${LG_THREADS:-2}
# BIN: another build to measure (for before/after figures in one session).
BIN=${BIN:-target/release/cloudlink}
mkdir -p "$OUT"

need=()
command -v curl >/dev/null || need+=(curl)
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
command -v jq >/dev/null || need+=(jq)
if [[ $SCENARIOS == *C* ]]; then
    command -v wireguard-go >/dev/null || need+=(wireguard-go)
    command -v wg >/dev/null || need+=(wireguard-tools)
    command -v ip >/dev/null || need+=(iproute2)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
[ "$BIN" = target/release/cloudlink ] && cargo build --release --quiet
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

UDP=51999
API=18999
PROXY=13999
GPID=
start_gateway() { # data-dir log
    "$BIN" serve --data-dir "$1" --listen "127.0.0.1:$UDP" --api "127.0.0.1:$API" \
        --proxy "127.0.0.1:$PROXY" --endpoint "127.0.0.1:$UDP" --log warn >"$2" 2>&1 &
    GPID=$!
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$API/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "the gateway did not become ready; see $2" >&2
    exit 1
}
stop_gateway() {
    [ -n "$GPID" ] && kill -TERM "$GPID" 2>/dev/null && wait "$GPID" 2>/dev/null || true
    GPID=
}
cleanup() {
    stop_gateway
    pkill -f "cloudlink loadgen" 2>/dev/null || true
    ip netns del clfleet 2>/dev/null || true
}
trap cleanup EXIT

completed_handshakes() {
    curl -s "http://127.0.0.1:$API/metrics" | awk -F' ' '/^cloudlink_handshakes_total\{result="completed"\}/ {print $2}'
}

kib() { awk -v b="$1" -v n="$2" 'BEGIN { printf "%.1f", b / n / 1024 }'; }

# ---------------------------------------------------------------- A
if [[ $SCENARIOS == *A* ]]; then
    echo "== A: $N devices at $RATE/s, then ${IDLE}s idle"
    rm -rf "$OUT/a" && mkdir -p "$OUT/a"
    start_gateway "$OUT/a/data" "$OUT/a/gateway.log"
    timeout $((IDLE + N / RATE + 300)) "$BIN" loadgen --gateway "127.0.0.1:$UDP" --api "http://127.0.0.1:$API" \
        --token-file "$OUT/a/data/api-token" --devices "$N" --rate "$RATE" --sockets 512 --threads "$LG_THREADS" \
        --duration "$((N / RATE + IDLE + 240))s" --exit-when-connected --settle "${IDLE}s" \
        --gateway-pid "$GPID" --timeline "$OUT/a/timeline.csv" >"$OUT/a/report.json" 2>"$OUT/a/loadgen.log"
    stop_gateway
    jq -c . "$OUT/a/report.json"
fi

# ---------------------------------------------------------------- B
if [[ $SCENARIOS == *B* ]]; then
    echo "== B: a storm of $N devices, then a gateway restart"
    rm -rf "$OUT/b" && mkdir -p "$OUT/b"
    start_gateway "$OUT/b/data" "$OUT/b/gateway.log"
    "$BIN" loadgen --gateway "127.0.0.1:$UDP" --api "http://127.0.0.1:$API" \
        --token-file "$OUT/b/data/api-token" --devices "$N" --storm --sockets 512 --threads 1 \
        --duration 600s --exit-when-connected --await-restart --settle 3s --gateway-pid "$GPID" \
        --status-file "$OUT/b/status" --timeline "$OUT/b/timeline.csv" >"$OUT/b/report.json" 2>"$OUT/b/loadgen.log" &
    LG=$!
    for _ in $(seq 1 3000); do
        c=$(cut -d' ' -f2 "$OUT/b/status" 2>/dev/null || echo 0)
        [ "$c" = "$N" ] && break
        kill -0 $LG 2>/dev/null || break
        sleep 0.2
    done
    sleep 5
    echo "$(completed_handshakes)" >"$OUT/b/handshakes_completed"
    echo "   all connected; restarting the gateway"
    stop_gateway
    start_gateway "$OUT/b/data" "$OUT/b/gateway2.log"
    wait $LG || true
    stop_gateway
    jq -c --arg hs "$(cat "$OUT/b/handshakes_completed")" '. + {gateway_handshakes_completed: ($hs | tonumber)}' \
        "$OUT/b/report.json" | tee "$OUT/b/report2.json"
fi

# ---------------------------------------------------------------- C
if [[ $SCENARIOS == *C* ]]; then
    echo "== C: a storm of $N_WG devices, cloudlink and wireguard-go side by side"
    rm -rf "$OUT/c" && mkdir -p "$OUT/c"
    # cloudlink, on loopback: boringtun-style indices, then random ones.
    for kind in "" "-random-index"; do
        start_gateway "$OUT/c/data$kind" "$OUT/c/gateway$kind.log"
        "$BIN" loadgen --gateway "127.0.0.1:$UDP" --api "http://127.0.0.1:$API" \
            --token-file "$OUT/c/data$kind/api-token" --devices "$N_WG" --storm --sockets 512 --source-ips 512 \
            ${kind:+--random-index} \
            --duration 300s --exit-when-connected --settle 2s --gateway-pid "$GPID" \
            --timeline "$OUT/c/cloudlink$kind-timeline.csv" >"$OUT/c/cloudlink$kind.json" 2>"$OUT/c/cloudlink$kind-loadgen.log"
        echo "$(completed_handshakes)" >"$OUT/c/cloudlink$kind-handshakes"
        stop_gateway
        jq -c . "$OUT/c/cloudlink$kind.json"
    done

    # wireguard-go in a namespace, reached over a veth pair.
    ip netns del clfleet 2>/dev/null || true
    ip link del clfleet0 2>/dev/null || true
    ip netns add clfleet
    ip link add clfleet0 type veth peer name clfleet1
    ip link set clfleet1 netns clfleet
    ip addr add 198.18.0.1/30 dev clfleet0
    ip link set clfleet0 up
    ip netns exec clfleet ip addr add 198.18.0.2/30 dev clfleet1
    ip netns exec clfleet ip link set clfleet1 up
    ip netns exec clfleet ip link set lo up
    # One source address per loadgen socket, as devices have their own:
    # wireguard-go (like the kernel) rate-limits handshakes per source
    # address while under load.
    for k in $(seq 0 511); do
        ip addr add "198.19.$(((k + 1) / 256)).$(((k + 1) % 256))/32" dev clfleet0 2>/dev/null || true
    done
    ip netns exec clfleet ip route add 198.19.0.0/16 dev clfleet1
    "$BIN" genkey >"$OUT/c/wg.key"
    WGPUB=$("$BIN" pubkey <"$OUT/c/wg.key")
    "$BIN" loadgen --prepare-only --devices "$N_WG" --keys "$OUT/c/keys" --wg-peers "$OUT/c/peers.conf" \
        2>>"$OUT/c/wg-loadgen.log" >/dev/null
    WG_PROCESS_FOREGROUND=1 ip netns exec clfleet wireguard-go -f wgfleet >"$OUT/c/wireguard-go.log" 2>&1 &
    WGPID=$!
    for _ in $(seq 1 100); do [ -S /run/wireguard/wgfleet.sock ] && break; sleep 0.1; done
    ip netns exec clfleet wg set wgfleet listen-port 51820 private-key "$OUT/c/wg.key"
    ip netns exec clfleet ip addr add 10.64.0.1/10 dev wgfleet
    ip netns exec clfleet ip link set wgfleet up
    rss0=$(awk '/VmRSS/ {print $2 * 1024}' /proc/$WGPID/status)
    t0=$(date +%s.%N)
    ip netns exec clfleet wg addconf wgfleet "$OUT/c/peers.conf"
    echo "   wireguard-go took $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s to load $N_WG peers"
    rss1=$(awk '/VmRSS/ {print $2 * 1024}' /proc/$WGPID/status)
    "$BIN" loadgen --no-register --keys "$OUT/c/keys" --gateway-public-key "$WGPUB" \
        --gateway 198.18.0.2:51820 --devices "$N_WG" --storm --sockets 512 \
        --source-net 198.19.0.0/16 --source-ips 512 \
        --duration 300s --exit-when-connected --settle 2s --gateway-pid "$WGPID" \
        --timeline "$OUT/c/wireguard-go-timeline.csv" >"$OUT/c/wireguard-go.json" 2>"$OUT/c/wg-loadgen.log"
    jq -c --arg r0 "$rss0" --arg r1 "$rss1" '. + {rss_before_peers: ($r0|tonumber), rss_with_peers: ($r1|tonumber)}' \
        "$OUT/c/wireguard-go.json" | tee "$OUT/c/wireguard-go2.json"
    kill "$WGPID" 2>/dev/null || true
    ip netns del clfleet
fi

# ---------------------------------------------------------------- figures
echo
echo "== figures ($(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
if [ -f "$OUT/a/report.json" ]; then
    jq -r --arg n "$N" '
      "A  connected \(.connected)/\(.devices) in \(.all_connected_s // "never") s at the ramp rate",
      "A  RSS per connected device: \(((.gateway_rss_bytes - .gateway_rss_registered_bytes) / .connected / 1024) * 10 | round / 10) KiB (limit 14 KiB); total RSS \(.gateway_rss_bytes / 1048576 | round) MiB",
      "A  idle CPU with all connected (keepalives and rekeys): \(.gateway_idle_cpu_pct * 10 | round / 10) % of one core (limit 30 %)"' \
      "$OUT/a/report.json"
fi
if [ -f "$OUT/b/report2.json" ]; then
    jq -r '
      "B  storm: all \(.devices) connected in \(.all_connected_s // "never") s; \(.handshakes_per_s | round) handshakes/s; p50 \(.handshake_p50_ms) ms, p99 \(.handshake_p99_ms) ms; \(.cookie_replies) cookie replies",
      "B  gateway CPU per handshake: \((.gateway_cpu_connect_s / .gateway_handshakes_completed * 1e6) | round) µs (\(.gateway_cpu_connect_s) s / \(.gateway_handshakes_completed) handshakes)",
      "B  after the restart: \(.back)/\(.connected_at_restart) back in \(.all_back_s // "never") s (limit 60 s); \(.redials_answered) redials answered"' \
      "$OUT/b/report2.json"
fi
if [ -f "$OUT/c/wireguard-go2.json" ]; then
    cl_hs=$(cat "$OUT/c/cloudlink-handshakes")
    jq -r --arg hs "$cl_hs" '
      "C  cloudlink     storm of \(.devices): all connected in \(.all_connected_s // "never") s, CPU per handshake \((.gateway_cpu_connect_s / ($hs|tonumber) * 1e6) | round) µs, RSS per device \(((.gateway_rss_bytes - .gateway_rss_registered_bytes) / .connected / 1024) * 10 | round / 10) KiB"' \
      "$OUT/c/cloudlink.json"
    if [ -f "$OUT/c/cloudlink-random-index.json" ]; then
        jq -r --arg hs "$(cat "$OUT/c/cloudlink-random-index-handshakes")" '
          "C  cloudlink     storm of \(.devices), random sender indices: all connected in \(.all_connected_s // "never") s, CPU per handshake \((.gateway_cpu_connect_s / ($hs|tonumber) * 1e6) | round) µs"' \
          "$OUT/c/cloudlink-random-index.json"
    fi
    jq -r '
      "C  wireguard-go  storm of \(.devices): all connected in \(.all_connected_s // "never") s, CPU per handshake \((.gateway_cpu_connect_s / .handshakes * 1e6) | round) µs, RSS per configured peer \(((.rss_with_peers - .rss_before_peers) / .devices / 1024) * 10 | round / 10) KiB (+ \(((.gateway_rss_bytes - .rss_with_peers) / .devices / 1024) * 10 | round / 10) KiB once connected)"' \
      "$OUT/c/wireguard-go2.json"
fi

# ---------------------------------------------------------------- plot
plots=()
[ -f "$OUT/a/timeline.csv" ] && plots+=("'$OUT/a/timeline.csv' using 1:2 every ::1 with lines lw 2 title 'cloudlink: $N devices at $RATE/s, then idle'")
[ -f "$OUT/b/timeline.csv" ] && plots+=("'$OUT/b/timeline.csv' using 1:2 every ::1 with lines lw 2 title 'cloudlink: storm of $N, then restart'")
[ -f "$OUT/c/cloudlink-timeline.csv" ] && plots+=("'$OUT/c/cloudlink-timeline.csv' using 1:2 every ::1 with lines lw 2 title 'cloudlink: storm of $N_WG'")
[ -f "$OUT/c/cloudlink-random-index-timeline.csv" ] && plots+=("'$OUT/c/cloudlink-random-index-timeline.csv' using 1:2 every ::1 with lines lw 2 title 'cloudlink: storm of $N_WG, random indices'")
[ -f "$OUT/c/wireguard-go-timeline.csv" ] && plots+=("'$OUT/c/wireguard-go-timeline.csv' using 1:2 every ::1 with lines lw 2 title 'wireguard-go: storm of $N_WG'")
if [ ${#plots[@]} -gt 0 ]; then
    joined=$(IFS=,; echo "${plots[*]}")
    gnuplot <<GP
set terminal pngcairo size 1000,560 font "DejaVu Sans,11"
set output '$OUT/storm.png'
set datafile separator ','
set key top left
set grid
set xlabel 'seconds since the first initiation'
set ylabel 'devices connected'
set title 'Devices connected over time ($(nproc) CPUs, loadgen on the same machine)'
plot $joined
GP
    echo "plot: $OUT/storm.png"
fi
# RESULTS=1: refresh the copies BENCHMARKS.md shows.
if [ "${RESULTS:-0}" = 1 ]; then
    mkdir -p benches/results
    [ -f "$OUT/storm.png" ] && cp "$OUT/storm.png" "benches/results/${PLOT_NAME:-storm}.png"
    for f in a/report.json b/report2.json c/cloudlink.json c/cloudlink-random-index.json c/wireguard-go2.json; do
        [ -f "$OUT/$f" ] && jq . "$OUT/$f" >"benches/results/${RESULT_PREFIX:-}$(echo "$f" | tr / -)"
    done
fi
