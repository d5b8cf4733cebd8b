#!/usr/bin/env bash
# A cloudlink cluster on one machine, in network namespaces: 3 NATS servers
# (JetStream), 2 or 3 gateways and an nftables UDP load balancer in front of
# them, laid out as a production cluster is (README, "Run a cluster").
#
#   devices ── 198.18.D.0/24 ──┐                 ┌── gw1 198.18.B.11
#   (ns <name>-d<i>)           │  <name>-lb      ├── gw2 198.18.B.12
#                  service address 198.18.D.1 ───┤── gw3 198.18.B.13
#                  UDP 51820, DNAT by a hash of  ├── nats 198.18.B.2 :4222-4224
#                  the device's address and port └── this host 198.18.B.254
#
# * Devices dial one service address. The load balancer picks a gateway with
#   `jhash ip saddr . udp sport mod N` and conntrack keeps the flow there.
# * Devices cannot reach the gateways' own addresses (the forward chain
#   drops it), as behind NAT. Packets a gateway originates (its redials of a
#   dead or stopped gateway's devices) are SNATed to the service address, so
#   a device sees every gateway as the one address it dials.
# * A health check (GET /healthz on each gateway, every 0.5 s) takes a
#   gateway out of the hash after 2 failures and deletes its conntrack
#   entries (`conntrack -D`), as a real load balancer does, so the devices'
#   next packets are hashed onto the survivors; it puts it back after 2
#   successes.
# * This host reaches the gateways' API (:8080) and proxy (:3128) and NATS on
#   the backend network 198.18.B.0/24.
#
# Usage (as root; needs ip, nft, conntrack, curl, and cloudlink and
# nats-server 2.11+ binaries):
#   run-local.sh up [--dir DIR] [--name NAME] [--net K] [--gateways 2|3]
#                   [--nats-servers 1|3] [--bin CLOUDLINK] [--nats-bin NATS]
#                   [-- extra `cloudlink serve` flags]
#   run-local.sh down [--dir DIR]
#   run-local.sh status [--dir DIR]
#   run-local.sh stop <gw> [--signal TERM|KILL] [--dir DIR]   # gw: 1, 2 or 3
#   run-local.sh start <gw> [--dir DIR]
#   run-local.sh add-device <i> [--dir DIR]   # namespace <name>-d<i>, 1..200
#
# NAME (default `clc`, at most 5 characters) prefixes the namespaces and
# links; K (default 0) picks the /24s: backend 198.18.K.0, devices
# 198.18.K+1.0 (K even, 0-254; 256-510 use 198.19). `up` writes DIR/cluster.env
# (addresses, ports, the token file) for scripts and tests to source.
set -euo pipefail

die() { echo "run-local.sh: $*" >&2; exit 1; }

cmd=${1:-}
[ -n "$cmd" ] || die "usage: run-local.sh up|down|status|stop|start|add-device (see the header)"
shift
arg=
case "$cmd" in stop|start|add-device) arg=${1:-}; [ -n "$arg" ] || die "$cmd needs an argument"; shift ;; esac

DIR=/tmp/cloudlink-cluster NAME=clc NET=0 GATEWAYS=2 NATS_SERVERS=3 SIGNAL=TERM
BIN= NATS_BIN=
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --net) NET=$2; shift 2 ;;
        --gateways) GATEWAYS=$2; shift 2 ;;
        --nats-servers) NATS_SERVERS=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --nats-bin) NATS_BIN=$2; shift 2 ;;
        --signal) SIGNAL=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option $1" ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

# ---- addresses ---------------------------------------------------------
net_prefix() { # /24 index -> "198.18.x" or "198.19.x"
    echo "198.$((18 + $1 / 256)).$(($1 % 256))"
}

load_env() {
    [ -f "$DIR/cluster.env" ] || die "no cluster in $DIR (run-local.sh up --dir $DIR)"
    # shellcheck disable=SC1091
    . "$DIR/cluster.env"
    NAME=$CLUSTER_NAME
}

lb() { ip netns exec "$NAME-lb" "$@"; }

# ---- the load balancer's rules -----------------------------------------
# The DNAT rule over the gateways that are up (a file of gateway numbers).
write_rules() {
    local up=("$@") n=${#up[@]} map="" i=0 g
    for g in "${up[@]}"; do
        map+="${map:+, }$i : $BACKEND.$((10 + g))"
        i=$((i + 1))
    done
    {
        echo "flush chain ip cloudlink_lb balance"
        if [ "$n" -gt 0 ]; then
            echo "add rule ip cloudlink_lb balance ip daddr $SERVICE_IP udp dport 51820 dnat to jhash ip saddr . udp sport mod $n map { $map }"
        fi
    } | lb nft -f -
}

setup_lb() {
    lb nft -f - <<EOF
table ip cloudlink_lb {
    chain balance {
        type nat hook prerouting priority dstnat; policy accept;
    }
    chain return_path {
        type nat hook postrouting priority srcnat; policy accept;
        # A gateway's own packets to a device (a redial) leave from the
        # service address: the device answers there, conntrack brings the
        # answer back to that gateway.
        oifname "br-dev" ip saddr $BACKEND.0/24 udp sport 51820 snat to $SERVICE_IP:51820
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        # Devices reach the gateways only through the service address.
        iifname "br-dev" oifname "br-back" ct status dnat udp dport 51820 accept
        iifname "br-back" oifname "br-dev" ip saddr $BACKEND.0/24 udp sport 51820 accept
    }
}
EOF
}

# ---- processes -----------------------------------------------------------
start_gateway() {
    local g=$1 ip="$BACKEND.$((10 + $1))"
    mkdir -p "$DIR/gw$g"
    # `ip netns exec` execs, so $! is the gateway's own pid.
    CLOUDLINK_TOKEN=$(cat "$DIR/token") ip netns exec "$NAME-g$g" "$CLOUDLINK_BIN" serve \
        --listen "$ip:51820" --api "$ip:8080" --proxy "$ip:3128" \
        --endpoint "$SERVICE_IP:51820" --gateway-id "gw$g" \
        --data-dir "$DIR/gw$g" --private-key-file "$DIR/cluster.key" \
        --nats "$NATS_URLS" "${GATEWAY_ARGS[@]}" \
        >>"$DIR/gw$g.log" 2>&1 &
    echo $! >"$DIR/gw$g.pid"
}

health_check() {
    # Runs in the background until `down`; state changes go to lb.log.
    local -A fails=() oks=() up=()
    local g changed
    for g in $(seq 1 "$GATEWAYS"); do fails[$g]=0; oks[$g]=0; up[$g]=0; done
    while [ -f "$DIR/cluster.env" ]; do
        changed=0
        for g in $(seq 1 "$GATEWAYS"); do
            if curl -fsS -m 1 -o /dev/null "http://$BACKEND.$((10 + g)):8080/healthz" 2>/dev/null; then
                fails[$g]=0; oks[$g]=$((oks[$g] + 1))
                if [ "${up[$g]}" = 0 ] && [ "${oks[$g]}" -ge 2 ]; then up[$g]=1; changed=1
                    echo "$(date +%T.%N | cut -c1-12) gw$g up" >>"$DIR/lb.log"; fi
            else
                oks[$g]=0; fails[$g]=$((fails[$g] + 1))
                if [ "${up[$g]}" = 1 ] && [ "${fails[$g]}" -ge 2 ]; then up[$g]=0; changed=1
                    echo "$(date +%T.%N | cut -c1-12) gw$g down" >>"$DIR/lb.log"; fi
            fi
        done
        if [ $changed = 1 ]; then
            local live=()
            for g in $(seq 1 "$GATEWAYS"); do [ "${up[$g]}" = 1 ] && live+=("$g"); done
            write_rules "${live[@]}"
            # A gateway taken out: its flows are forgotten, so the devices'
            # next packets are hashed onto the gateways still up.
            for g in $(seq 1 "$GATEWAYS"); do
                if [ "${up[$g]}" = 0 ]; then
                    lb conntrack -D -p udp --reply-src "$BACKEND.$((10 + g))" >/dev/null 2>&1 || true
                    lb conntrack -D -p udp --orig-src "$BACKEND.$((10 + g))" >/dev/null 2>&1 || true
                fi
            done
            # Flows that arrived while no gateway was up were not balanced
            # (their answers would come from the service address itself).
            lb conntrack -D -p udp --reply-src "$SERVICE_IP" >/dev/null 2>&1 || true
            echo "${live[*]}" >"$DIR/lb.up"
        fi
        sleep 0.5
    done
}

veth_into() { # veth_into <ns|host> <bridge-side name> <bridge> <addr/24> [default route]
    # The namespace's end is called eth0 there (made under a temporary name
    # here: the host has its own eth0).
    local tmp="${2%b}"
    ip link add "$2" type veth peer name "$tmp"
    ip link set "$2" netns "$NAME-lb"
    lb ip link set "$2" master "$3" up
    if [ "$1" = host ]; then
        ip addr add "$4" dev "$tmp"; ip link set "$tmp" up
    else
        ip link set "$tmp" netns "$1"
        ip netns exec "$1" ip link set "$tmp" name eth0
        ip netns exec "$1" ip addr add "$4" dev eth0
        ip netns exec "$1" ip link set eth0 up
        ip netns exec "$1" ip link set lo up
        if [ -n "${5:-}" ]; then ip netns exec "$1" ip route add default via "$5"; fi
    fi
}

case "$cmd" in
up)
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
    for t in ip nft conntrack curl; do
        command -v $t >/dev/null || die "needs $t (apt-get install iproute2 nftables conntrack curl)"
    done
    [ ${#NAME} -le 5 ] || die "--name is at most 5 characters (interface names)"
    case "$GATEWAYS" in 2|3) ;; *) die "--gateways is 2 or 3" ;; esac
    case "$NATS_SERVERS" in 1|3) ;; *) die "--nats-servers is 1 or 3" ;; esac
    BIN=${BIN:-$(command -v cloudlink || echo "$root/target/release/cloudlink")}
    NATS_BIN=${NATS_BIN:-$( [ -x "$root/target/tools/nats-server" ] && echo "$root/target/tools/nats-server" || command -v nats-server || true)}
    [ -x "$BIN" ] || die "no cloudlink binary at $BIN (cargo build --release, or --bin)"
    BIN=$(realpath "$BIN") NATS_BIN=$(realpath "$NATS_BIN")
    [ -x "$NATS_BIN" ] || die "no nats-server (2.11+; bash tests/run.sh puts one in target/tools, or --nats-bin)"
    [ ! -f "$DIR/cluster.env" ] || die "a cluster is already up in $DIR (run-local.sh down --dir $DIR)"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    BACKEND=$(net_prefix "$NET") DEVNET=$(net_prefix $((NET + 1)))
    SERVICE_IP=$DEVNET.1
    # Leftovers of an interrupted run with the same name.
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NAME-" || true); do ip netns del "$ns"; done
    ip link del "${NAME}h" 2>/dev/null || true

    ip netns add "$NAME-lb"
    lb sysctl -qw net.ipv4.ip_forward=1
    # Frames switched inside a bridge are not the load balancer's business
    # (with br_netfilter loaded they would meet the forward chain's drop).
    for f in /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-ip6tables; do
        lb sh -c "[ ! -f $f ] || echo 0 >$f"
    done
    lb ip link set lo up
    lb ip link add br-back type bridge; lb ip addr add "$BACKEND.1/24" dev br-back; lb ip link set br-back up
    lb ip link add br-dev type bridge; lb ip addr add "$SERVICE_IP/24" dev br-dev; lb ip link set br-dev up
    veth_into host "${NAME}hb" br-back "$BACKEND.254/24"
    ip netns add "$NAME-nats"
    veth_into "$NAME-nats" "${NAME}nb" br-back "$BACKEND.2/24" "$BACKEND.1"
    for g in $(seq 1 "$GATEWAYS"); do
        ip netns add "$NAME-g$g"
        veth_into "$NAME-g$g" "${NAME}g${g}b" br-back "$BACKEND.$((10 + g))/24" "$BACKEND.1"
    done

    # NATS: one server, or a cluster of three.
    NATS_URLS=
    for i in $(seq 1 "$NATS_SERVERS"); do
        mkdir -p "$DIR/nats$i"
        routes=()
        if [ "$NATS_SERVERS" -gt 1 ]; then
            r=""
            for j in $(seq 1 "$NATS_SERVERS"); do
                [ "$j" = "$i" ] || r+="${r:+,}nats://$BACKEND.2:$((6221 + j))"
            done
            routes=(--cluster_name cloudlink --cluster "nats://$BACKEND.2:$((6221 + i))" --routes "$r")
        fi
        ip netns exec "$NAME-nats" "$NATS_BIN" -js -sd "$DIR/nats$i" -n "nats$i" \
            -a "$BACKEND.2" -p $((4221 + i)) -m $((8221 + i)) "${routes[@]}" \
            >>"$DIR/nats$i.log" 2>&1 &
        echo $! >"$DIR/nats$i.pid"
        NATS_URLS+="${NATS_URLS:+,}nats://$BACKEND.2:$((4221 + i))"
    done
    for i in $(seq 1 "$NATS_SERVERS"); do
        for t in $(seq 1 101); do
            curl -fsS -m 1 -o /dev/null "http://$BACKEND.2:$((8221 + i))/healthz?js-enabled-only=true" 2>/dev/null && break
            [ "$t" -lt 101 ] || die "nats$i not healthy within 20 s; see $DIR/nats$i.log"
            sleep 0.2
        done
    done

    [ -f "$DIR/cluster.key" ] || (umask 077; "$BIN" genkey >"$DIR/cluster.key")
    [ -f "$DIR/token" ] || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/token")
    {
        echo "CLUSTER_NAME=$NAME"
        echo "GATEWAYS=$GATEWAYS"
        echo "BACKEND=$BACKEND"
        echo "DEVNET=$DEVNET"
        echo "SERVICE_IP=$SERVICE_IP"
        echo "SERVICE=$SERVICE_IP:51820"
        echo "NATS_URLS=$NATS_URLS"
        echo "CLOUDLINK_BIN=$BIN"
        echo "TOKEN_FILE=$DIR/token"
        if [ ${#EXTRA[@]} -gt 0 ]; then
            printf 'GATEWAY_ARGS=(%s)\n' "$(printf '%q ' "${EXTRA[@]}")"
        else
            echo 'GATEWAY_ARGS=()'
        fi
        for g in $(seq 1 "$GATEWAYS"); do
            echo "GW${g}_API=http://$BACKEND.$((10 + g)):8080"
            echo "GW${g}_PROXY=$BACKEND.$((10 + g)):3128"
        done
    } >"$DIR/cluster.env"
    load_env
    lb nft add table ip cloudlink_lb 2>/dev/null || true
    setup_lb
    : >"$DIR/lb.up"
    for g in $(seq 1 "$GATEWAYS"); do start_gateway "$g"; done
    health_check </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/lb.pid"
    # Up when every gateway is in the load balancer.
    for _ in $(seq 1 240); do
        [ "$(wc -w <"$DIR/lb.up")" = "$GATEWAYS" ] && break
        sleep 0.25
    done
    [ "$(wc -w <"$DIR/lb.up")" = "$GATEWAYS" ] || die "gateways not up within 60 s; see $DIR/gw*.log"
    echo "cluster up: devices dial $SERVICE; APIs $(for g in $(seq 1 "$GATEWAYS"); do printf 'http://%s:8080 ' "$BACKEND.$((10 + g))"; done); token in $DIR/token"
    ;;
down)
    load_env
    rm -f "$DIR/cluster.env.down"
    mv "$DIR/cluster.env" "$DIR/cluster.env.down" # stops the health check
    for f in "$DIR"/lb.pid "$DIR"/gw*.pid "$DIR"/nats*.pid "$DIR"/dev*.pid; do
        [ -f "$f" ] || continue
        kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 0.5
    for f in "$DIR"/lb.pid "$DIR"/gw*.pid "$DIR"/nats*.pid "$DIR"/dev*.pid; do
        [ -f "$f" ] || continue
        kill -9 "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NAME-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    done
    ip link del "${NAME}h" 2>/dev/null || true
    echo "cluster down"
    ;;
status)
    load_env
    echo "devices dial $SERVICE; in the load balancer: gateways $(cat "$DIR/lb.up")"
    for g in $(seq 1 "$GATEWAYS"); do
        pid=$(cat "$DIR/gw$g.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then s="running (pid $pid)"; else s="stopped"; fi
        echo "gw$g $BACKEND.$((10 + g)): $s"
    done
    lb conntrack -L -p udp 2>/dev/null | grep -c "dport=51820" | sed 's/^/UDP flows in conntrack: /' || true
    ;;
stop)
    load_env
    pid=$(cat "$DIR/gw$arg.pid" 2>/dev/null) || die "no gw$arg"
    kill -s "$SIGNAL" "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$DIR/gw$arg.pid"
    ;;
start)
    load_env
    [ ! -f "$DIR/gw$arg.pid" ] || ! kill -0 "$(cat "$DIR/gw$arg.pid")" 2>/dev/null || die "gw$arg is running"
    start_gateway "$arg"
    ;;
add-device)
    load_env
    [ "$arg" -ge 1 ] && [ "$arg" -le 200 ] || die "device number is 1..200"
    ns="$NAME-d$arg"
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    veth_into "$ns" "${NAME}d${arg}b" br-dev "$DEVNET.$((20 + arg))/24" "$SERVICE_IP"
    echo "$ns $DEVNET.$((20 + arg))"
    ;;
*) die "unknown command $cmd" ;;
esac
