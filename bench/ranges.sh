#!/usr/bin/env bash
# ranges.sh — section (r) of bench/run.sh: ranges of a cold 1 GiB blob (issue 20).
#
# Usage: bench/ranges.sh OUT_DIR [RUNS]
#   Needs what run.sh starts first: the peers of /work/shared/bench (peers.sh), the seeded
#   upstream ($BASE/seed.env, $BASE/seed/big.layer) and ociedge (bench/ociedge.sh).
#   RANGES_TARGETS (default "upstream A B Bslice ociedge") picks the targets.
#   Starts its own nginx with the `slice` module (peer Bslice, 127.0.0.1:16005: proxy_cache keyed
#   by 1 MiB slices, the nginx way to cache ranges), stopped on exit by its PID file.
#
# Per target (upstream direct, A Distribution proxy, B nginx proxy_cache, Bslice, ociedge), after
# a cache reset each time, RUNS times (median (min–max)):
#   r1   first range: 1 MiB at 900 MiB of the cold 1 GiB blob: total and TTFB (ms), bytes checked
#   r16  16 parallel 64 MiB ranges covering the cold 1 GiB blob: wall (s), all bytes checked
#        (the concatenation hashes to the digest), upstream GETs × bytes (origin's access log)
# Writes OUT_DIR/ranges.md (a markdown table) and appends raw lines to OUT_DIR/raw.tsv.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:?usage: ranges.sh OUT_DIR [RUNS]}
RUNS=${2:-3}
BASE=${BASE:-/tmp/perfbase}
PEERS=${PEERS:-/work/shared/bench/peers.sh}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
SLICE_PORT=${SLICE_PORT:-16005}
UPSTREAM_LOG=$BASE/logs/upstream.access.log
REF=$BASE/seed/big.layer
SD=$BASE/nginx-slice
SPID=$BASE/run/nginx-slice.pid
# shellcheck disable=SC1091
source "$BASE/seed.env"
mkdir -p "$OUT" "$SD/tmp" "$BASE/run" "$BASE/logs"
TMPD=$(mktemp -d "$OUT/ranges.XXXXXX")
RAW=$OUT/raw.tsv

log() { echo "[$(date +%T)] ranges.sh: $*" >&2; }
now() { date +%s.%N; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

slice_conf() {
  cat >"$SD/nginx.conf" <<NGX
worker_processes auto;
pid $SPID;
error_log $BASE/logs/nginx-slice.err.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path $SD/tmp/body; proxy_temp_path $SD/tmp/proxy;
  fastcgi_temp_path $SD/tmp/fcgi; uwsgi_temp_path $SD/tmp/uwsgi; scgi_temp_path $SD/tmp/scgi;
  default_type application/octet-stream;
  proxy_cache_path $SD/cache levels=1:2 keys_zone=bs:64m max_size=64g inactive=60d use_temp_path=off;
  upstream registry { server 127.0.0.1:16000; keepalive 64; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host \$http_host;
  proxy_read_timeout 900s;
  proxy_ignore_headers X-Accel-Expires Expires Cache-Control Set-Cookie;
  server {
    listen 127.0.0.1:$SLICE_PORT;
    location ~ ^/v2/.+/blobs/sha256: {
      slice 1m;
      proxy_cache bs;
      proxy_cache_key \$uri\$slice_range;
      proxy_set_header Range \$slice_range;
      proxy_cache_valid 200 206 60d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 880s;
      proxy_pass http://registry;
    }
    location / { proxy_cache off; proxy_pass http://registry; }
  }
}
NGX
}

slice_stop() {
  alive "$SPID" || return 0
  "$NGINX_BIN" -c "$SD/nginx.conf" -p "$SD" -e "$BASE/logs/nginx-slice.err.log" -s quit || true
  for _ in $(seq 100); do alive "$SPID" || break; sleep 0.1; done
  if alive "$SPID"; then kill "$(cat "$SPID")"; fi
  rm -f "$SPID"
}

slice_start() {
  slice_conf
  "$NGINX_BIN" -t -q -c "$SD/nginx.conf" -p "$SD" -e "$BASE/logs/nginx-slice.err.log"
  "$NGINX_BIN" -c "$SD/nginx.conf" -p "$SD" -e "$BASE/logs/nginx-slice.err.log"
  for _ in $(seq 100); do curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$SLICE_PORT/v2/" && return 0; sleep 0.1; done
  echo "ranges.sh: nginx slice did not start" >&2; exit 1
}

cleanup() { set +e; slice_stop; rm -rf "$TMPD"; }
trap cleanup EXIT

reset() { # reset NAME: empty NAME's cache
  case $1 in
    upstream) : ;;
    Bslice) slice_stop; rm -rf "$SD/cache"; slice_start ;;
    *) "$HERE/ociedge.sh" reset "$1" >/dev/null ;;
  esac
}

# upstream access-log accounting (as compare.sh does): byte offset now; "GETs bytes" since MARK
up_mark() { [[ -f $UPSTREAM_LOG ]] && stat -c %s "$UPSTREAM_LOG" || echo 0; }
up_settle() { # until the origin's log stops growing (fills finish after the client)
  local a b i; for ((i = 0; i < 40; i++)); do a=$(up_mark); sleep 0.5; b=$(up_mark); [[ $a == "$b" ]] && return 0; done
}
settle() { # settle NAME: NAME's background fill is over, then the origin's log is still
  # (a fill's whole-blob GET is logged only when it ends, which the log's growth cannot show)
  local i
  if [[ $1 == ociedge ]]; then
    for ((i = 0; i < 600; i++)); do
      [[ $(curl -s --max-time 2 "${URL[ociedge]}/metrics" | awk '$1=="ociedge_fills_in_flight"{print $2}') == 0 ]] && break
      sleep 0.5
    done
  fi
  up_settle
}
up_count() {
  tail -c +"$(($1 + 1))" "$UPSTREAM_LOG" | grep -F "/blobs/$BIG_BLOB " | grep -F '"GET ' |
    awk '{ if (match($0, /" [0-9][0-9][0-9] [0-9]+ /)) { split(substr($0, RSTART+2, RLENGTH-3), a, " "); n++; b += a[2] } }
         END { printf "%d %d\n", n, b }'
}

stats() { # "v1 v2 ..." [decimals] -> "median (min–max)"
  echo "$1" | tr ' ' '\n' | grep -v '^$' | sort -g | awk -v d="${2:-0}" '
    {v[NR]=$1} END { if (NR==0) {print "n/a"; exit}
      m = (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2
      f="%." d "f"; printf(f " (" f "–" f ")\n", m, v[1], v[NR]) }'
}

read -r -a NAMES <<<"${RANGES_TARGETS:-upstream A B Bslice ociedge}"
declare -A URL=([upstream]=http://127.0.0.1:16000 [A]=http://127.0.0.1:16001 [B]=http://127.0.0.1:16002
  [Bslice]=http://127.0.0.1:$SLICE_PORT [ociedge]=http://127.0.0.1:${OCIEDGE_PORT:-16010})
MIB=1048576
R1_START=$((900 * MIB))
R1_SUM=$(dd if="$REF" bs=$MIB skip=$((R1_START / MIB)) count=1 status=none | sha256sum | cut -d' ' -f1)
PART=$((BIG_SIZE / 16))

declare -A CELL
run_target() { # run_target NAME URL
  local name=$1 u=$2/v2/$BIG_REPO/blobs/$BIG_BLOB i k m t0 t1 code size tt tot last
  local r1s="" r1t="" r1ok=0 r16s="" r16ok=0 ups="" n b
  for ((i = 0; i < RUNS; i++)); do
    reset "$name"; up_settle
    read -r code size tt tot < <(curl -s --max-time 600 -o "$TMPD/r1" -r "$R1_START-$((R1_START + MIB - 1))" \
      -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' "$u")
    [[ $code == 206 && $(sha256sum "$TMPD/r1" | cut -d' ' -f1) == "$R1_SUM" ]] && r1ok=$((r1ok + 1))
    r1s+=" $(awk -v x="$tot" 'BEGIN{printf "%.1f", x*1000}')"; r1t+=" $(awk -v x="$tt" 'BEGIN{printf "%.1f", x*1000}')"
    settle "$name"

    reset "$name"; up_settle; m=$(up_mark)
    t0=$(now)
    for k in $(seq 0 15); do
      last=$((k * PART + PART - 1)); ((k < 15)) || last=$((BIG_SIZE - 1))
      curl -s --max-time 600 -o "$TMPD/p.$k" -r "$((k * PART))-$last" -w '%{http_code}\n' "$u" >"$TMPD/p.$k.code" &
    done
    wait
    t1=$(now)
    if ! grep -qv '^206$' "$TMPD"/p.*.code && [[ "sha256:$(for k in $(seq 0 15); do cat "$TMPD/p.$k"; done | sha256sum | cut -d' ' -f1)" == "$BIG_BLOB" ]]; then
      r16ok=$((r16ok + 1))
    fi
    rm -f "$TMPD"/p.*
    settle "$name"; read -r n b < <(up_count "$m")
    r16s+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')"
    ups+=" ${n}×/$(awk -v b="$b" 'BEGIN{printf "%.2f", b/1073741824}')GiB"
  done
  printf '%s\tr1\traw\ttotal_ms=%s ttfb_ms=%s ok=%s/%s\n' "$name" "$r1s" "$r1t" "$r1ok" "$RUNS" >>"$RAW"
  printf '%s\tr16\traw\twall=%s ok=%s/%s up=%s\n' "$name" "$r16s" "$r16ok" "$RUNS" "$ups" >>"$RAW"
  CELL[$name|r1]="$(stats "$r1s" 1)"; CELL[$name|r1t]="$(stats "$r1t" 1)"; CELL[$name|r1ok]="$r1ok/$RUNS"
  CELL[$name|r16]="$(stats "$r16s" 3)"; CELL[$name|r16ok]="$r16ok/$RUNS"; CELL[$name|r16up]="$(echo $ups | tr ' ' ',')"
  for k in r1 r16; do printf '%s\t%s\t%s\n' "$name" "$k" "${CELL[$name|$k]}" >>"$RAW"; done
}

slice_start
for name in "${NAMES[@]}"; do
  log "$name: (r) ranges of a cold 1 GiB blob"
  run_target "$name" "${URL[$name]}"
done

{
  echo "Ranges of a cold 1 GiB blob (section r, \`bench/ranges.sh\`), runs per cell: $RUNS, median (min–max), a cache reset before each measurement; loadavg $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Bslice = nginx proxy_cache with \`slice 1m\` (127.0.0.1:$SLICE_PORT). Targets: r1 ≤ upstream's r1 + 2 ms; r16 ≤ 1.2× upstream's r16."
  echo
  printf '| metric |'; printf ' %s |' "${NAMES[@]}"; echo
  printf '|---|'; printf -- '---|%.0s' "${NAMES[@]}"; echo
  while IFS='|' read -r key label; do
    printf '| %s |' "$label"; for n in "${NAMES[@]}"; do printf ' %s |' "${CELL[$n|$key]:--}"; done; echo
  done <<'ROWS'
r1|(r) first range, 1 MiB at 900 MiB of a cold 1 GiB blob: total ms
r1t|(r) first range: TTFB ms
r1ok|(r) first range: right bytes (runs)
r16|(r) 16 parallel 64 MiB ranges covering a cold 1 GiB blob: wall s
r16ok|(r) 16 ranges: all right bytes (runs)
r16up|(r) 16 ranges: upstream GETs × bytes (per run)
ROWS
} | tee "$OUT/ranges.md"
