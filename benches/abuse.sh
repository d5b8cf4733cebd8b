#!/usr/bin/env bash
# Abuse (issue "Hold up under abuse"): five attacks, each for 30 s (the
# issue's bound), on the release gateway with 100 legitimate devices connected, all
# on loopback: a junk flood, a mac1-only initiation flood, a
# cookie-answering initiation flood from one address, a roaming flood from
# one device, slow API clients. Prints for each the attack rate, the
# gateway's CPU and RSS before and after, the share of legitimate
# handshakes answered within 2 s and echo p50/p99 over established links;
# writes benches/results/abuse.json. The whole run takes about 3.5 minutes
# and stops by itself (every loop is bounded in time).
#
# Targets: RSS grows by at most 16 MiB during each attack; under the
# one-source cookie-answering flood at least 99 % of the legitimate
# handshakes answered within 2 s and echo p99 under 50 ms.
#
# Usage: bash benches/abuse.sh
#        ATTACKS=3 bash benches/abuse.sh     (only the third attack)
#        SLOW_CLIENTS=500 bash benches/abuse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench abuse
