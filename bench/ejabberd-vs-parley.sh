#!/usr/bin/env bash
# Parley and ejabberd side by side, in one run of one load generator.
#
# Installs ejabberd from Debian's package if it is missing, starts a private instance on
# loopback with bench/ejabberd.yml (plain c2s, shaper off, offline storage on, in-band
# registration) in a temporary directory, then runs `parley bench --ramp` against a
# `parley serve` child process and that ejabberd, alternating step by step with the same pairs,
# rates and step length, and prints one table (max sustained messages/s, p50/p99 per step,
# server CPU and RSS) with the ratio Parley / ejabberd.
#
# Usage: bench/ejabberd-vs-parley.sh [RATES] [STEP_SECS] [PAIRS]
#   RATES      comma-separated offered rates, messages/s  (default 5000,10000,...,50000)
#   STEP_SECS  seconds per step                           (default 10)
#   PAIRS      sender/receiver pairs                      (default 50)
# Environment: PARLEY (the parley binary; default: build and use target/release/parley),
#              EJABBERD_PORT (default 15222).
set -euo pipefail

RATES=${1:-5000,10000,15000,20000,25000,30000,35000,40000,45000,50000}
STEP_SECS=${2:-10}
PAIRS=${3:-50}
PORT=${EJABBERD_PORT:-15222}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

if ! command -v ejabberdctl >/dev/null; then
  echo "installing ejabberd from Debian's package ..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ejabberd >/dev/null
fi
# The package starts a system instance where it can; ours is separate (own node, port, spool).

if [ -z "${PARLEY:-}" ]; then
  (cd "$ROOT" && cargo build --release -q)
  PARLEY="${CARGO_TARGET_DIR:-$ROOT/target}/release/parley"
fi

DIR=$(mktemp -d /tmp/parley-ejabberd.XXXXXX)
NODE="parleybench$$@localhost"
mkdir -p "$DIR/spool" "$DIR/logs"
sed "s/@PORT@/$PORT/" "$HERE/ejabberd.yml" >"$DIR/ejabberd.yml"
cp /etc/ejabberd/inetrc "$DIR/inetrc"
: >"$DIR/ejabberdctl.cfg"
chown -R ejabberd "$DIR" 2>/dev/null || true
CTL=(ejabberdctl --config-dir "$DIR" --ctl-config "$DIR/ejabberdctl.cfg" --spool "$DIR/spool"
     --logs "$DIR/logs" --node "$NODE")

stop() {
  "${CTL[@]}" stop >/dev/null 2>&1 || true
  sleep 1
  [ -n "${EJ_PID:-}" ] && kill "$EJ_PID" 2>/dev/null || true
  rm -rf "$DIR"
}
trap stop EXIT

"${CTL[@]}" foreground >"$DIR/logs/foreground.log" 2>&1 &
for _ in $(seq 1 60); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  sleep 1
done
EJ_PID=$(pgrep -f "beam.smp.*$NODE" | head -1 || true)
if [ -z "$EJ_PID" ]; then
  echo "ejabberd did not start; its log:" >&2
  cat "$DIR/logs/"*.log >&2 || true
  exit 1
fi
echo "ejabberd $(dpkg-query -W -f='${Version}' ejabberd 2>/dev/null || echo '?') running as pid $EJ_PID on 127.0.0.1:$PORT" >&2

# Both servers and the generator share this machine's cores; so do the file limits.
ulimit -n "$(ulimit -Hn)"
"$PARLEY" bench --ramp "$RATES" --step-secs "$STEP_SECS" --pairs "$PAIRS" \
  --xmpp "127.0.0.1:$PORT" --xmpp-domain xmpp.bench --xmpp-pid "$EJ_PID"
