#!/usr/bin/env bash
# ociedge.sh — run ociedge next to the peers of /work/shared/bench for compare.sh.
#
# Usage:
#   ociedge.sh start          write the bench config, check it, start ociedge, wait for /healthz
#   ociedge.sh stop           stop ociedge (by its PID file only)
#   ociedge.sh status         running / stopped
#   ociedge.sh reset NAME     compare.sh --reset-cmd: NAME=ociedge -> stop, wipe data dir, start;
#                             any other NAME -> peers.sh reset NAME (its exit code, 3 = n/a)
#   ociedge.sh pids NAME      compare.sh --pids-cmd: NAME=ociedge -> its PID; others -> peers.sh pids
#
# Layout (under $BASE, default /tmp/perfbase, the same tree as peers.sh):
#   $BASE/ociedge/ociedge.yaml   config        $BASE/ociedge/data   local engine (file://)
#   $BASE/run/ociedge.pid        PID file      $BASE/logs/ociedge.log  stderr/stdout
# Env: BASE, OCIEDGE_BIN (default <repo>/target/release/ociedge), OCIEDGE_PORT (default 16010),
#      OCIEDGE_TAG_TTL (default 30s, same as peer B's B_TAG_TTL), PEERS (default
#      /work/shared/bench/peers.sh), OCIEDGE_LOG (ociedge's log filter, default warn).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${BASE:-/tmp/perfbase}
OCIEDGE_BIN=${OCIEDGE_BIN:-$HERE/../target/release/ociedge}
OCIEDGE_PORT=${OCIEDGE_PORT:-16010}
OCIEDGE_TAG_TTL=${OCIEDGE_TAG_TTL:-30s}
PEERS=${PEERS:-/work/shared/bench/peers.sh}
export OCIEDGE_LOG=${OCIEDGE_LOG:-warn}
DIR=$BASE/ociedge
DATA=$DIR/data
CFG=$DIR/ociedge.yaml
RUN=$BASE/run
LOGS=$BASE/logs
PIDF=$RUN/ociedge.pid

die() { echo "ociedge.sh: $*" >&2; exit 1; }
alive() { [[ -s $PIDF ]] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }

write_config() {
  mkdir -p "$DIR" "$RUN" "$LOGS"
  cat >"$CFG" <<YAML
listen: 127.0.0.1:$OCIEDGE_PORT
region: bench
storage:
  preference: local
  engines:
    local: { url: "file://$DATA" }
upstreams:
  - name: docker.io
    url: http://127.0.0.1:16000
cache: { tag_ttl: $OCIEDGE_TAG_TTL, max_stale: 24h }
YAML
  "$OCIEDGE_BIN" check-config --config "$CFG" >/dev/null || die "invalid config $CFG"
}

wait_healthz() {
  local i
  for ((i = 0; i < 200; i++)); do
    if [[ $(curl -s -o /dev/null --max-time 1 -w '%{http_code}' "http://127.0.0.1:$OCIEDGE_PORT/healthz") == 200 ]]; then
      return 0
    fi
    alive || die "ociedge exited during startup; see $LOGS/ociedge.log"
    sleep 0.1
  done
  die "ociedge did not answer /healthz on 127.0.0.1:$OCIEDGE_PORT within 20s"
}

start() {
  alive && { echo "ociedge already running (pid $(cat "$PIDF"))"; return 0; }
  [[ -x $OCIEDGE_BIN ]] || die "$OCIEDGE_BIN not built (cargo build --release)"
  ! (exec 3<>"/dev/tcp/127.0.0.1/$OCIEDGE_PORT") 2>/dev/null || die "port $OCIEDGE_PORT is already in use"
  write_config
  mkdir -p "$DATA"
  # setsid: own session, so a Ctrl-C on the bench does not race our orderly stop.
  setsid "$OCIEDGE_BIN" serve --config "$CFG" </dev/null >>"$LOGS/ociedge.log" 2>&1 &
  echo $! >"$PIDF"
  wait_healthz
  echo "ociedge: pid $(cat "$PIDF") on 127.0.0.1:$OCIEDGE_PORT (data $DATA)"
}

stop() {
  local pid i
  [[ -f $PIDF ]] || return 0
  pid=$(cat "$PIDF")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  fi
  rm -f "$PIDF"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) if alive; then echo "ociedge: running pid $(cat "$PIDF")"; else echo "ociedge: stopped"; fi ;;
  reset)
    case ${2:?peer name} in
      ociedge) stop; rm -rf "$DATA"; start >/dev/null ;;
      *) exec "$PEERS" reset "$2" ;;
    esac ;;
  pids)
    case ${2:?peer name} in
      ociedge) alive && cat "$PIDF" ;;
      *) exec "$PEERS" pids "$2" ;;
    esac ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
