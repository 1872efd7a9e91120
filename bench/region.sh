#!/usr/bin/env bash
# region.sh — the herd of 16 cold GETs of the 64 MiB blob (bench/mid) spread over a region of 3
# ociedge processes on one file:// engine with cluster:, beside the same herd on 1 process
# (same binary, same upstream, same run). Prints one markdown table; run.sh appends it.
#
# Usage: bench/region.sh [RUNS]     (default 3; needs the peers of run.sh up and seeded)
# Env: BASE (default /tmp/perfbase), OCIEDGE_BIN (default <repo>/target/release/ociedge),
#      UPSTREAM (default http://127.0.0.1:16000), UPSTREAM_LOG (default
#      $BASE/logs/upstream.access.log), REGION_PORT (default 16020: 16020..16022 for the region,
#      16023 for the single process).
# Everything it starts is stopped on exit, by PID.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${BASE:-/tmp/perfbase}
OCIEDGE_BIN=${OCIEDGE_BIN:-$HERE/../target/release/ociedge}
UPSTREAM=${UPSTREAM:-http://127.0.0.1:16000}
UPSTREAM_LOG=${UPSTREAM_LOG:-$BASE/logs/upstream.access.log}
PORT0=${REGION_PORT:-16020}
RUNS=${1:-3}
source "$BASE/seed.env"
DIR=$BASE/region
PIDS=()
export OCIEDGE_CLUSTER_SECRET=bench-region-secret OCIEDGE_LOG=${OCIEDGE_LOG:-warn}

cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

now() { date +%s.%N; }
up_mark() { stat -c %s "$UPSTREAM_LOG" 2>/dev/null || echo 0; }
up_settle() { local a b i; for ((i = 0; i < 40; i++)); do a=$(up_mark); sleep 0.5; b=$(up_mark); [[ $a == "$b" ]] && return 0; done; }
up_gets() { [[ -f $UPSTREAM_LOG ]] || { echo "?"; return; }; tail -c +"$(($1 + 1))" "$UPSTREAM_LOG" | grep -F "/blobs/$MID_BLOB " | grep -cF '"GET ' || true; }

start_one() { # start_one PORT DATA [cluster]
  local cfg=$DIR/$1.yaml
  {
    echo "listen: 127.0.0.1:$1"
    echo "storage: { preference: local, engines: { local: { url: \"file://$2\" } } }"
    echo "upstreams: [ { name: docker.io, url: \"$UPSTREAM\" } ]"
    [[ ${3:-} == cluster ]] && echo "cluster: { secret_env: OCIEDGE_CLUSTER_SECRET }"
  } >"$cfg"
  "$OCIEDGE_BIN" serve --config "$cfg" >>"$DIR/$1.log" 2>&1 &
  PIDS+=($!)
  local i
  for ((i = 0; i < 200; i++)); do
    curl -sf -o /dev/null "http://127.0.0.1:$1/healthz" && return 0
    sleep 0.1
  done
  echo "region.sh: ociedge on :$1 did not start; see $DIR/$1.log" >&2; exit 1
}

stop_all() { cleanup; PIDS=(); }

herd() { # herd PORT... -> "wall ok gets"
  local ports=("$@") m t0 t1 k good=0 code curls=()
  m=$(up_mark); rm -f "$DIR"/herd.*
  t0=$(now)
  for k in $(seq 0 15); do
    curl -s --max-time 600 -o "$DIR/herd.$k.body" -w '%{http_code}\n' \
      "http://127.0.0.1:${ports[$((k % ${#ports[@]}))]}/v2/$MID_REPO/blobs/$MID_BLOB" >"$DIR/herd.$k.w" &
    curls+=($!)
  done
  wait "${curls[@]}" || true
  t1=$(now)
  for k in $(seq 0 15); do
    read -r code <"$DIR/herd.$k.w"
    [[ $code == 200 && "sha256:$(sha256sum "$DIR/herd.$k.body" | cut -d' ' -f1)" == "$MID_BLOB" ]] && good=$((good + 1))
  done
  rm -f "$DIR"/herd.*
  up_settle
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') $good $(up_gets "$m")"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }

mkdir -p "$DIR"
one_w="" one_ok="" one_up="" reg_w="" reg_ok="" reg_up=""
for ((i = 0; i < RUNS; i++)); do
  rm -rf "$DIR/one" "$DIR/shared"
  start_one $((PORT0 + 3)) "$DIR/one"
  read -r w ok up < <(herd $((PORT0 + 3)))
  one_w+=" $w"; one_ok+=" $ok/16"; one_up+=" $up"
  stop_all
  for p in 0 1 2; do start_one $((PORT0 + p)) "$DIR/shared" cluster; done
  read -r w ok up < <(herd "$PORT0" $((PORT0 + 1)) $((PORT0 + 2)))
  reg_w+=" $w"; reg_ok+=" $ok/16"; reg_up+=" $up"
  stop_all
done
ow=$(echo "$one_w" | median); rw=$(echo "$reg_w" | median)
echo "| herd 16×64 MiB cold | wall s (median of $RUNS) | clients correct | upstream GETs |"
echo "|---|---|---|---|"
echo "| 1 process | $ow |${one_ok} |${one_up} |"
echo "| 3 processes, cluster:, one file:// engine | $rw |${reg_ok} |${reg_up} |"
echo
echo "Region wall / one-process wall: $(awk -v a="$rw" -v b="$ow" 'BEGIN{printf "%.2f", a/b}') (target ≤ 1.2; nginx proxy_cache is row (d) of compare.sh above)."
