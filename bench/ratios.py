#!/usr/bin/env python3
"""ratios.py RAW_TSV [TARGET_NAME] — ociedge's compare.sh figures as ratios to the peers of the
same run, with the performance targets of bench/README.md marked met / missed.

RAW_TSV is compare.sh's $OUT/raw.tsv: lines "name<TAB>key<TAB>cell" and
"name<TAB>key<TAB>raw<TAB>values" (per-run values; medians are recomputed from these).
Prints one markdown table on stdout. Peers: upstream, A, B, static (as started by peers.sh).
"""
import re
import statistics
import sys

raw_path = sys.argv[1]
ME = sys.argv[2] if len(sys.argv) > 2 else "ociedge"

cells, raws = {}, {}
with open(raw_path, encoding="utf-8") as f:
    for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 4 and parts[2] == "raw":
            raws[(parts[0], parts[1])] = parts[3]
        elif len(parts) == 3:
            cells[(parts[0], parts[1])] = parts[2]


def med(xs):
    return statistics.median(xs) if xs else None


def nums(s):
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", s)]


def field(name, key, label):
    """Per-run values of `label=` in a raw line ("rps= 1 2 3 p50= ...")."""
    r = raws.get((name, key))
    if r is None:
        return []
    m = re.search(label + r"=([^=]*?)(?:\s+[a-z_0-9]+=|$)", r)
    return nums(m.group(1)) if m else []


def a(name, key):
    r = raws.get((name, key))
    return med(nums(r)) if r else None


def b(name, key, what):
    return med(field(name, key, what))


def c(name, what):
    return med(field(name, "c", what))


def d_wall(name):
    return med(field(name, "d", "wall"))


def d_gets(name):
    """Median upstream GETs per herd run ("16×/1024MiB ...")."""
    r = raws.get((name, "d"))
    if not r:
        return None
    m = re.search(r"up=(.*)$", r)
    gets = [int(x) for x in re.findall(r"(\d+)×", m.group(1))] if m else []
    return med(gets)


def e(name, key):
    v = cells.get((name, key))
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def fmt(x, dec=0):
    if x is None:
        return "–"
    return f"{x:,.{dec}f}".replace(",", " ") if abs(x) >= 10000 else f"{x:.{dec}f}"


def ratio(x, y):
    if x is None or y is None or y == 0:
        return None
    return x / y


def rx(x):
    return "–" if x is None else f"{x:.2f}×"


def verdict(ok):
    return "–" if ok is None else ("**met**" if ok else "**missed**")


rows = []  # (metric, ociedge, peers, ratios, target, verdict)

# (a) warm throughput: higher is better
for key, label, goal in (("a1", "1 client", 1.2), ("a4", "4 clients aggregate", 1.1)):
    me, st, up, bb = a(ME, key), a("static", key), a("upstream", key), a("B", key)
    best = max([v for v in (st, up) if v is not None], default=None)
    r_best = ratio(me, best)
    rows.append((f"(a) warm 1 GiB blob, {label}, MiB/s", fmt(me),
                 f"static {fmt(st)}, upstream {fmt(up)}, B {fmt(bb)}",
                 f"{rx(r_best)} vs max(static, upstream); {rx(ratio(me, bb))} vs B",
                 f"≥{goal}× max(static, upstream)",
                 verdict(None if r_best is None else r_best >= goal)))

# (b) manifests: req/s higher is better, p99 lower is better
for key, label in (("btag", "manifest by tag"), ("bdig", "manifest by digest")):
    me, bb, aa = b(ME, key, "rps"), b("B", key, "rps"), b("A", key, "rps")
    p_me, p_b, p_a = b(ME, key, "p99"), b("B", key, "p99"), b("A", key, "p99")
    r_b = ratio(me, bb)
    ok = None if r_b is None or p_me is None or p_b is None else (r_b >= 2.0 and p_me <= p_b)
    rows.append((f"(b) {label}: req/s · p99 ms", f"{fmt(me)} · {fmt(p_me, 2)}",
                 f"B {fmt(bb)} · {fmt(p_b, 2)}; A {fmt(aa)} · {fmt(p_a, 2)}",
                 f"{rx(r_b)} vs B, {rx(ratio(me, aa))} vs A; p99 {fmt(p_me, 2)} vs B {fmt(p_b, 2)} ms",
                 "≥2.0× B req/s, p99 ≤ B", verdict(ok)))

me, st, bb = b(ME, "bhead", "rps"), b("static", "bhead", "rps"), b("B", "bhead", "rps")
p_me, p_st, p_b = b(ME, "bhead", "p99"), b("static", "bhead", "p99"), b("B", "bhead", "p99")
r_st = ratio(me, st)
rows.append(("(b) HEAD small blob: req/s · p99 ms", f"{fmt(me)} · {fmt(p_me, 2)}",
             f"static {fmt(st)} · {fmt(p_st, 2)}; B {fmt(bb)} · {fmt(p_b, 2)}",
             f"{rx(r_st)} vs static, {rx(ratio(me, bb))} vs B",
             "≥0.9× static", verdict(None if r_st is None else r_st >= 0.9)))

# (c) cold: lower is better (ratio < 1 = faster than B)
me, bb = c(ME, "ttfb_ms"), c("B", "ttfb_ms")
rows.append(("(c) cold 1 GiB, TTFB ms", fmt(me, 1), f"B {fmt(bb, 1)}",
             f"{rx(ratio(me, bb))} of B (lower is better)", "–", "–"))
me, bb = c(ME, "total"), c("B", "total")
rows.append(("(c) cold 1 GiB, total s", fmt(me, 2), f"B {fmt(bb, 2)}",
             f"{rx(ratio(me, bb))} of B (lower is better)", "–", "–"))

# (d) herd
me, bb = d_wall(ME), d_wall("B")
rows.append(("(d) herd 16×64 MiB cold, wall s", fmt(me, 2), f"B {fmt(bb, 2)}",
             f"{rx(ratio(me, bb))} of B (lower is better)", "–", "–"))
me, bb, up = d_gets(ME), d_gets("B"), d_gets("upstream")
rows.append(("(d) herd: upstream GETs per run", fmt(me), f"B {fmt(bb)}, upstream direct {fmt(up)}",
             f"{fmt(me)} vs B {fmt(bb)}", "–", "–"))

# (e) CPU and memory
me, bb, st = e(ME, "e_cpu"), e("B", "e_cpu"), e("static", "e_cpu")
rows.append(("(e) CPU s per GiB served (warm, 1 client)", fmt(me, 2),
             f"B {fmt(bb, 2)}, static {fmt(st, 2)}",
             f"{rx(ratio(me, bb))} of B (lower is better)", "≤0.45 s/GiB",
             verdict(None if me is None else me <= 0.45)))
for key, label in (("e_a", "(a)"), ("e_b", "(b)")):
    me, bb = e(ME, key), e("B", key)
    rows.append((f"(e) peak RSS during {label}, MiB", fmt(me), f"B {fmt(bb)}",
                 f"{rx(ratio(me, bb))} of B", "–", "–"))

# (r) ranges of a cold blob (bench/ranges.sh): lower is better
if any(k[1] in ("r1", "r16") for k in raws):
    me, up = med(field(ME, "r1", "total_ms")), med(field("upstream", "r1", "total_ms"))
    bb, bs = med(field("B", "r1", "total_ms")), med(field("Bslice", "r1", "total_ms"))
    rows.append(("(r) first range, 1 MiB at 900 MiB of a cold 1 GiB blob, ms", fmt(me, 1),
                 f"upstream {fmt(up, 1)}, B {fmt(bb, 1)}, B slice {fmt(bs, 1)}",
                 f"{rx(ratio(me, up))} of upstream", "≤ upstream + 2 ms",
                 verdict(None if me is None or up is None else me <= up + 2.0)))
    me, up = med(field(ME, "r16", "wall")), med(field("upstream", "r16", "wall"))
    bb, bs = med(field("B", "r16", "wall")), med(field("Bslice", "r16", "wall"))
    r_up = ratio(me, up)
    rows.append(("(r) 16 parallel ranges of a cold 1 GiB blob, wall s", fmt(me, 3),
                 f"upstream {fmt(up, 3)}, B {fmt(bb, 3)}, B slice {fmt(bs, 3)}",
                 f"{rx(r_up)} of upstream", "≤1.2× upstream",
                 verdict(None if r_up is None else r_up <= 1.2)))

print(f"| metric | {ME} | peers (same run) | ratio | target | verdict |")
print("|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
