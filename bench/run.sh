#!/usr/bin/env bash
# run.sh — one-command benchmark of ociedge against the baseline peers of /work/shared/bench.
#
# Usage: bench/run.sh [--runs N] [--wrk-duration D] [--label L] [--only LIST]
#   --runs N          repetitions per measurement, median reported (compare.sh default 3)
#   --wrk-duration D  wrk/ab duration per run, e.g. 10s (compare.sh default 10s)
#   --label L         result file bench/results/YYYY-MM-DD-L.md (default: ociedge)
#   --only LIST       sections, e.g. "a,b,e" (default a,b,c,d,e,f,r); a-f are compare.sh's,
#                     r is bench/ranges.sh's (ranges of a cold 1 GiB blob, with an nginx `slice` peer)
#
# Steps: cargo build --release --locked; peers.sh start (installs docker-registry, nginx, wrk,
# apache2-utils via apt if missing); seed-upstream.sh; ociedge on 127.0.0.1:16010 (bench/ociedge.sh);
# compare.sh upstream A B static ociedge; when r is run, bench/ranges.sh; when b is run, compare.sh --only b --pin again (servers on
# CPU 0, wrk/ab on CPU 1); when c is run, bench/cold_cpu.sh (server CPU per cold GiB);
# bench/results/<date>-<label>.md = compare.sh's tables +
# ociedge-vs-peers ratios (bench/ratios.py) + the herd over a region of 3 processes
# (bench/region.sh, with section d) + raw TSV next to it. Everything it started (ociedge,
# and the peers unless they were already running) is stopped on exit, by PID file only.
# Env: BASE (default /tmp/perfbase), SHARED_BENCH (default /work/shared/bench).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$(dirname "$0")/../.." && pwd)/shared/bench}
export BASE=${BASE:-/tmp/perfbase}
export PEERS=$SHARED_BENCH/peers.sh
LABEL=ociedge
PASS=()
ONLY=a,b,c,d,e,f,r
RUNS=3

usage() { sed -n '2,17p' "$0"; exit 2; }
while (($#)); do
  case $1 in
    --runs|--wrk-duration) [[ $# -ge 2 ]] || usage; PASS+=("$1" "$2"); [[ $1 == --runs ]] && RUNS=$2; shift 2 ;;
    --only) [[ $# -ge 2 ]] || usage; ONLY=$2; shift 2 ;;
    --label) [[ $# -ge 2 ]] || usage; LABEL=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "run.sh: unknown argument: $1" >&2; usage ;;
  esac
done
[[ $LABEL =~ ^[A-Za-z0-9._-]+$ ]] || { echo "run.sh: --label must be [A-Za-z0-9._-]+" >&2; exit 2; }
[[ $ONLY =~ ^[a-fr](,[a-fr])*$ ]] || { echo "run.sh: --only takes sections a-f and r, comma-separated" >&2; exit 2; }

log() { echo "[$(date +%T)] run.sh: $*" >&2; }

STARTED_PEERS=0 STARTED_OCIEDGE=0
cleanup() {
  local rc=$?
  set +e
  if ((STARTED_OCIEDGE)); then log "stopping ociedge"; "$HERE/ociedge.sh" stop; fi
  if ((STARTED_PEERS)); then log "stopping peers"; "$PEERS" stop; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. build
log "cargo build --release --locked"
(cd "$ROOT" && cargo build --release --locked)
BUILT=$(date -u +%FT%TZ)
# what was built (the tree may change while the bench runs)
REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted changes')"

# 2. peers (reused when a previous peers.sh start is still up; then left running)
peer_state=$("$PEERS" status)
if [[ $peer_state == *stopped* ]]; then
  STARTED_PEERS=1
  "$PEERS" start
else
  log "peers already running: reusing them (not stopped at the end)"
fi
log "seeding the upstream"
"$SHARED_BENCH/seed-upstream.sh" seed >/dev/null

# 3. ociedge, from an empty cache
if [[ $("$HERE/ociedge.sh" status) == *running* ]]; then
  echo "run.sh: an ociedge from an earlier bench is still running ($BASE/run/ociedge.pid); stop it first: bench/ociedge.sh stop" >&2
  exit 1
fi
rm -rf "$BASE/ociedge/data"
STARTED_OCIEDGE=1
"$HERE/ociedge.sh" start

# 4. compare (compare.sh's sections, then section r: bench/ranges.sh)
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$BASE/results/$STAMP-$LABEL
COMPARE_ONLY=$(tr ',' '\n' <<<"$ONLY" | { grep -v '^r$' || true; } | paste -sd, -)
mkdir -p "$OUT"; : >"$OUT/table.md"; : >"$OUT/raw.tsv"
[[ -z $COMPARE_ONLY ]] || {
log "compare.sh (raw results in $OUT)"
"$SHARED_BENCH/compare.sh" "${PASS[@]}" --only "$COMPARE_ONLY" --out "$OUT" \
  --reset-cmd "$HERE/ociedge.sh reset" --pids-cmd "$HERE/ociedge.sh pids" \
  --upstream-log "$BASE/logs/upstream.access.log" \
  --retag-cmd "$SHARED_BENCH/seed-upstream.sh retag-small" \
  --ref-file "$BASE/seed/big.layer" \
  upstream=http://127.0.0.1:16000 A=http://127.0.0.1:16001 B=http://127.0.0.1:16002 \
  static=http://127.0.0.1:16003 ociedge=http://127.0.0.1:16010 >/dev/null
}
if [[ ,$ONLY, == *,r,* ]]; then
  log "ranges.sh (section r)"
  "$HERE/ranges.sh" "$OUT" "$RUNS" >/dev/null
fi

# 4b. section b again with the servers pinned to CPU 0 and wrk/ab to CPU 1 (issue 22: both
# figures recorded), and section c's server CPU per cold GiB, which compare.sh does not measure
has() { [[ ",$ONLY," == *",$1,"* ]]; }
if has b; then
  log "compare.sh --only b --pin"
  "$SHARED_BENCH/compare.sh" "${PASS[@]}" --only b --pin --out "$OUT-pinned" \
    --reset-cmd "$HERE/ociedge.sh reset" --pids-cmd "$HERE/ociedge.sh pids" \
    upstream=http://127.0.0.1:16000 A=http://127.0.0.1:16001 B=http://127.0.0.1:16002 \
    static=http://127.0.0.1:16003 ociedge=http://127.0.0.1:16010 >/dev/null
fi
if has c; then
  log "cold_cpu.sh (server CPU per cold GiB)"
  "$HERE/cold_cpu.sh" --runs "$RUNS" A=http://127.0.0.1:16001 B=http://127.0.0.1:16002 \
    ociedge=http://127.0.0.1:16010 >"$OUT-cold-cpu.md"
fi

# 4c. the herd over a region of 3 processes (cluster:) beside 1 process, same binary and upstream
REGION=""
if has d; then
  log "region.sh: herd over 3 processes"
  REGION=$("$HERE/region.sh" 3) || log "region.sh failed"
fi

# 5. results
mkdir -p "$HERE/results"
DEST=$HERE/results/$(date +%F)-$LABEL
cp "$OUT/raw.tsv" "$DEST-raw.tsv"
{
  echo "# ociedge vs peers — $(date +%F) ($LABEL)"
  echo
  echo "ociedge built from $REV at $BUILT, \`bench/run.sh${PASS[*]:+ ${PASS[*]}} --label $LABEL\`; CPU: $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)."
  echo "Peers: upstream = docker-registry :16000, A = Distribution proxy :16001, B = nginx proxy_cache :16002, static = nginx sendfile :16003; ociedge :16010 (tag_ttl 30s, file:// engine)."
  echo
  echo "## compare.sh"
  echo
  cat "$OUT/table.md"
  echo
  if [[ -f $OUT/ranges.md ]]; then
    echo "## Ranges of a cold blob (section r)"
    echo
    cat "$OUT/ranges.md"
    echo
  fi
  echo "## ociedge relative to the peers of the same run"
  echo
  echo "Medians of the per-run values. Throughput and req/s: ratio > 1 = ociedge better; times, CPU and RSS: ratio < 1 = ociedge better."
  echo
  python3 "$HERE/ratios.py" "$OUT/raw.tsv" ociedge
  echo
  if [[ -n $REGION ]]; then
    echo "## A region of 3 processes (cluster:)"
    echo
    echo "$REGION"
    echo
  fi
  if [[ -f $OUT-pinned/table.md ]]; then
    echo
    echo "## Section b pinned (\`compare.sh --only b --pin\`: servers on CPU 0, wrk/ab on CPU 1)"
    echo
    cat "$OUT-pinned/table.md"
    echo
    python3 "$HERE/ratios.py" "$OUT-pinned/raw.tsv" ociedge
    cp "$OUT-pinned/raw.tsv" "$DEST-pinned-raw.tsv"
  fi
  if [[ -f $OUT-cold-cpu.md ]]; then
    echo
    echo "## Cold 1 GiB: server CPU per GiB (\`bench/cold_cpu.sh\`: reset, one cold GET, CPU of the server's processes until it settles)"
    echo
    cat "$OUT-cold-cpu.md"
  fi
  echo
  echo "Raw data: \`$(basename "$DEST")-raw.tsv\` (compare.sh's raw.tsv)."
} >"$DEST.md"
log "wrote $DEST.md"
cat "$DEST.md"
