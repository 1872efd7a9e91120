#!/usr/bin/env bash
# cold_cpu.sh — server CPU seconds per cold GiB (issue 22): what compare.sh's section (c) does not
# measure. For each target: reset its cache (ociedge.sh reset NAME), read the CPU ticks of its
# server processes (ociedge.sh pids NAME), GET the cold 1 GiB blob once, wait until the server's
# CPU stops moving (the commit after the last byte is part of the cost), read the ticks again.
#
# Usage: cold_cpu.sh [--runs N] NAME=URL...      (run by bench/run.sh when section c is run)
# Output: a markdown table on stdout: per target, median (min–max) of total s, TTFB ms and
#         server CPU s per GiB; progress on stderr.
# Env: BASE (default /tmp/perfbase), the seed env $BASE/seed.env (seed-upstream.sh writes it).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${BASE:-/tmp/perfbase}
RUNS=3
TARGETS=()
while (($#)); do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    *=*) TARGETS+=("$1"); shift ;;
    *) echo "cold_cpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck disable=SC1091
source "$BASE/seed.env"
log() { echo "[$(date +%T)] cold_cpu.sh: $*" >&2; }
ticks() { local p s=0 v; for p in $("$HERE/ociedge.sh" pids "$1" 2>/dev/null); do
  v=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0); s=$((s + v)); done; echo "$s"; }
settle() { # wait until the server's CPU ticks stop moving for 0.6 s (at most 15 s)
  local last now i same=0
  last=$(ticks "$1")
  for ((i = 0; i < 75 && same < 3; i++)); do
    sleep 0.2; now=$(ticks "$1")
    if [[ $now == "$last" ]]; then same=$((same + 1)); else same=0; last=$now; fi
  done
  echo "$last"
}
stats() { # "v v v" [decimals] -> "median (min–max)"
  echo "$1" | tr ' ' '\n' | grep -v '^$' | sort -g | awk -v d="${2:-2}" '{v[NR]=$1} END{
    if (NR == 0) { print "n/a"; exit } m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2
    printf "%.*f (%.*f–%.*f)", d, m, d, v[1], d, v[NR] }'
}
clk=$(getconf CLK_TCK)
echo "| target | cold 1 GiB total s | TTFB ms | server CPU s/GiB |"
echo "|---|---|---|---|"
for spec in "${TARGETS[@]}"; do
  name=${spec%%=*} url=${spec#*=}
  tots="" ttfbs="" cpus=""
  for ((i = 0; i < RUNS; i++)); do
    "$HERE/ociedge.sh" reset "$name" >/dev/null 2>&1 || { log "$name: reset failed"; continue; }
    settle "$name" >/dev/null
    c0=$(ticks "$name")
    read -r code size tt tot < <(curl -s --max-time 600 -o /dev/null \
      -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' "$url/v2/$BIG_REPO/blobs/$BIG_BLOB")
    c1=$(settle "$name")
    [[ $code == 200 && $size == "$BIG_SIZE" ]] || { log "$name run $i bad: $code $size"; continue; }
    tots+=" $tot"; ttfbs+=" $(awk -v x="$tt" 'BEGIN{printf "%.1f", x*1000}')"
    cpus+=" $(awk -v t=$((c1 - c0)) -v h="$clk" -v s="$BIG_SIZE" 'BEGIN{printf "%.3f", t/h/(s/1073741824)}')"
    log "$name run $i: total ${tot}s cpu $((c1 - c0)) ticks"
  done
  echo "| $name | $(stats "$tots") | $(stats "$ttfbs" 1) | $(stats "$cpus") |"
done
