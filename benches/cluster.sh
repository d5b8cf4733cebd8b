#!/usr/bin/env bash
# Cluster mode at fleet scale (issue "Cluster mode, part 2"), bounded in
# time, on this machine, with a single gateway measured in the same run:
#
#   S. single gateway: a storm of N loadgen devices against one gateway
#      without NATS (loopback): time to all connected, CPU per handshake.
#   K. cluster: deploy/cluster/run-local.sh with 2 gateways, 1 NATS server
#      and the nftables load balancer; N devices registered through gateway
#      1, then the same storm from a namespace behind the balancer (it
#      splits the devices by a hash of their source port): time to all
#      connected, CPU per handshake (both gateways, and NATS beside), NATS
#      messages and JetStream API calls per second at steady state, and
#      after `kill -9` of one gateway the time until the survivor has
#      marked its devices down (reaped) and until it holds all N again.
#
# Figures are printed and written to $OUT (JSON). Every run stops by itself
# (loadgen --duration, bounded waits); traffic stays on loopback and in the
# namespaces the script creates (198.18.30.0/24, 198.18.31.0/24).
#
# Usage: bash benches/cluster.sh          (N=100000)
#        N=20000 bash benches/cluster.sh  (a quicker look)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100000}
OUT=${OUT:-target/cluster-bench}
BIN=$PWD/target/release/cloudlink
RUN_LOCAL=deploy/cluster/run-local.sh
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

need=()
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
command -v nft >/dev/null || need+=(nftables)
command -v conntrack >/dev/null || need+=(conntrack)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
cargo build --release --quiet
[ -x target/tools/nats-server ] || { echo "needs target/tools/nats-server: run bash tests/run.sh once" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cpu_s() { # utime + stime of a pid, in seconds
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0
}
metric() { # metric <api> <series>
    # (awk reads everything: an early exit would fail curl with SIGPIPE)
    curl -s -m 2 "$1/metrics" | awk -v s="$2" '$1 == s && v == "" {v = $2} END {print v}'
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

GPID=
LGPID=
cleanup() {
    [ -n "$GPID" ] && kill "$GPID" 2>/dev/null || true
    [ -n "$LGPID" ] && kill "$LGPID" 2>/dev/null || true
    [ -f "$OUT/k/cluster.env" ] && bash "$RUN_LOCAL" down --dir "$OUT/k" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ---------------------------------------------------------------- S
echo "== S: a storm of $N devices against a single gateway"
rm -rf "$OUT/s" && mkdir -p "$OUT/s"
"$BIN" serve --data-dir "$OUT/s/data" --listen 127.0.0.1:52999 --api 127.0.0.1:19999 \
    --proxy 127.0.0.1:14999 --endpoint 127.0.0.1:52999 --log warn >"$OUT/s/gateway.log" 2>&1 &
GPID=$!
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:19999/readyz >/dev/null && break; sleep 0.1; done
"$BIN" loadgen --gateway 127.0.0.1:52999 --api http://127.0.0.1:19999 \
    --token-file "$OUT/s/data/api-token" --devices "$N" --storm --sockets 512 --threads 1 \
    --duration 600s --exit-when-connected --settle 2s --gateway-pid "$GPID" \
    >"$OUT/s/report.json" 2>"$OUT/s/loadgen.log"
S_HS=$(metric http://127.0.0.1:19999 'cloudlink_handshakes_total{result="completed"}')
kill -TERM "$GPID"; wait "$GPID" 2>/dev/null || true; GPID=
jq -c --arg hs "$S_HS" '{all_connected_s, gateway_cpu_connect_s, handshakes: ($hs|tonumber),
    cpu_per_handshake_us: (.gateway_cpu_connect_s / ($hs|tonumber) * 1e6 | round)}' \
    "$OUT/s/report.json" | tee "$OUT/single.json"

# ---------------------------------------------------------------- K
echo "== K: $N devices over 2 gateways, 1 NATS server, behind the load balancer"
rm -rf "$OUT/k"
bash "$RUN_LOCAL" up --dir "$OUT/k" --name clbn --net 30 --gateways 2 --nats-servers 1 \
    --bin "$BIN" --nats-bin "$PWD/target/tools/nats-server" -- --log warn
# shellcheck disable=SC1091
. "$OUT/k/cluster.env"
G1=$(cat "$OUT/k/gw1.pid") G2=$(cat "$OUT/k/gw2.pid") NP=$(cat "$OUT/k/nats1.pid")
NATS_MON="http://$BACKEND.2:8222"
t=$(now)
"$BIN" loadgen --register-only --api "$GW1_API" --token-file "$TOKEN_FILE" --devices "$N" \
    --keys "$OUT/k/keys" --uuid-prefix lc- >/dev/null 2>"$OUT/k/register.log"
REGISTER_S=$(since "$t")
echo "   $N devices registered through gw1 in $REGISTER_S s"
read -r DEV_NS _ < <(bash "$RUN_LOCAL" add-device 1 --dir "$OUT/k")
PUB=$("$BIN" pubkey <"$OUT/k/cluster.key")
c1=$(cpu_s "$G1") c2=$(cpu_s "$G2") cn=$(cpu_s "$NP")
ip netns exec "$DEV_NS" "$BIN" loadgen --no-register --keys "$OUT/k/keys" --gateway-public-key "$PUB" \
    --gateway "$SERVICE" --devices "$N" --storm --sockets 512 --threads 1 --duration 900s \
    --status-file "$OUT/k/status" --timeline "$OUT/k/timeline.csv" \
    >"$OUT/k/loadgen.json" 2>"$OUT/k/loadgen.log" &
LGPID=$!
t=$(now)
CONNECTED_S=
for _ in $(seq 1 3000); do
    c=$(cut -d' ' -f2 "$OUT/k/status" 2>/dev/null || echo 0)
    if [ "$c" = "$N" ]; then CONNECTED_S=$(cut -d' ' -f1 "$OUT/k/status"); break; fi
    kill -0 "$LGPID" 2>/dev/null || break
    sleep 0.2
done
[ -n "$CONNECTED_S" ] || { echo "not all connected: $(cat "$OUT/k/status")" >&2; exit 1; }
d1=$(awk -v a="$c1" -v b="$(cpu_s "$G1")" 'BEGIN {print b - a}')
d2=$(awk -v a="$c2" -v b="$(cpu_s "$G2")" 'BEGIN {print b - a}')
dn=$(awk -v a="$cn" -v b="$(cpu_s "$NP")" 'BEGIN {print b - a}')
H1=$(metric "$GW1_API" 'cloudlink_handshakes_total{result="completed"}')
H2=$(metric "$GW2_API" 'cloudlink_handshakes_total{result="completed"}')
O1=$(metric "$GW1_API" cloudlink_cluster_owned_devices)
O2=$(metric "$GW2_API" cloudlink_cluster_owned_devices)
echo "   all $N connected in $CONNECTED_S s (gw1 holds $O1, gw2 $O2)"

# Steady state: everything connected, keepalives and rekeys only.
sleep 10
m0=$(curl -s "$NATS_MON/varz" | jq .in_msgs) a0=$(curl -s "$NATS_MON/jsz" | jq .api.total)
sleep 30
m1=$(curl -s "$NATS_MON/varz" | jq .in_msgs) a1=$(curl -s "$NATS_MON/jsz" | jq .api.total)
STEADY_MSGS=$(awk -v a="$m0" -v b="$m1" 'BEGIN {printf "%.1f", (b - a) / 30}')
STEADY_API=$(awk -v a="$a0" -v b="$a1" 'BEGIN {printf "%.1f", (b - a) / 30}')
echo "   steady state: $STEADY_MSGS NATS messages/s, $STEADY_API JetStream API calls/s"

# kill -9 of the gateway holding more devices.
if [ "${O1%.*}" -ge "${O2%.*}" ]; then DEAD=1 LIVE=2 HELD=$O1; else DEAD=2 LIVE=1 HELD=$O2; fi
LIVE_API=$(eval echo "\$GW${LIVE}_API")
DEAD_PID=$(eval echo "\$G${DEAD}")
echo "   kill -9 of gw$DEAD (holding $HELD)"
t=$(now)
kill -9 "$DEAD_PID"
DOWN_S= BACK_S=
for _ in $(seq 1 2400); do
    # Marked down: no device is on the dead gateway's records any more
    # (each was reaped, or came back here first).
    dir=$(metric "$LIVE_API" cloudlink_cluster_directory_devices)
    o=$(metric "$LIVE_API" cloudlink_cluster_owned_devices)
    if [ -z "$DOWN_S" ] && [ -n "$o" ] && [ "$dir" = "$o" ]; then DOWN_S=$(since "$t"); fi
    if [ "${o%.*}" = "$N" ] 2>/dev/null; then BACK_S=$(since "$t"); break; fi
    sleep 0.25
done
o=$(metric "$LIVE_API" cloudlink_cluster_owned_devices)
REDIALS=$(metric "$LIVE_API" cloudlink_cluster_takeover_redials_total)
REAPED=$(metric "$LIVE_API" cloudlink_cluster_reaped_devices_total)
echo "   none left on gw$DEAD's records after ${DOWN_S:-never} s ($REAPED reaped, the rest back first); all $N held by gw$LIVE after ${BACK_S:-never} s ($o held at the end; $REDIALS takeover redials)"
kill "$LGPID" 2>/dev/null || true; wait "$LGPID" 2>/dev/null || true; LGPID=

jq -n --argjson n "$N" --arg reg "$REGISTER_S" --arg conn "$CONNECTED_S" \
    --arg d1 "$d1" --arg d2 "$d2" --arg dn "$dn" --arg h1 "$H1" --arg h2 "$H2" \
    --arg o1 "$O1" --arg o2 "$O2" --arg msgs "$STEADY_MSGS" --arg api "$STEADY_API" \
    --arg held "$HELD" --arg down "${DOWN_S:-null}" --arg back "${BACK_S:-null}" --arg redials "$REDIALS" --arg reaped "$REAPED" '{
      devices: $n, register_s: ($reg|tonumber), all_connected_s: ($conn|tonumber),
      held: [($o1|tonumber), ($o2|tonumber)],
      gateway_cpu_connect_s: (($d1|tonumber) + ($d2|tonumber)), nats_cpu_connect_s: ($dn|tonumber),
      handshakes: (($h1|tonumber) + ($h2|tonumber)),
      cpu_per_handshake_us: ((($d1|tonumber) + ($d2|tonumber)) / (($h1|tonumber) + ($h2|tonumber)) * 1e6 | round),
      cpu_per_handshake_with_nats_us: ((($d1|tonumber) + ($d2|tonumber) + ($dn|tonumber)) / (($h1|tonumber) + ($h2|tonumber)) * 1e6 | round),
      steady_nats_msgs_per_s: ($msgs|tonumber), steady_jetstream_api_per_s: ($api|tonumber),
      killed_held: ($held|tonumber), marked_down_s: ($down|tonumber? // null),
      all_back_s: ($back|tonumber? // null), takeover_redials: ($redials|tonumber? // null),
      reaped: ($reaped|tonumber? // null)
    }' | tee "$OUT/cluster.json"

echo
echo "== figures ($(nproc) CPUs, loadgen, gateways and NATS on the same machine)"
jq -r '"S  single gateway: all \(.handshakes) connected in \(.all_connected_s) s, CPU per handshake \(.cpu_per_handshake_us) µs"' "$OUT/single.json"
jq -r '"K  2 gateways + NATS: all \(.devices) connected in \(.all_connected_s) s (split \(.held)), CPU per handshake \(.cpu_per_handshake_us) µs (\(.cpu_per_handshake_with_nats_us) µs with NATS)",
       "K  steady state: \(.steady_nats_msgs_per_s) NATS messages/s, \(.steady_jetstream_api_per_s) JetStream API calls/s",
       "K  kill -9 of the gateway holding \(.killed_held): none left on its records after \(.marked_down_s) s (\(.reaped) reaped, the rest back first), all back on the survivor after \(.all_back_s) s"' "$OUT/cluster.json"
if [ "${RESULTS:-0}" = 1 ]; then
    mkdir -p benches/results
    jq . "$OUT/single.json" >benches/results/cluster-single.json
    jq . "$OUT/cluster.json" >benches/results/cluster.json
fi
