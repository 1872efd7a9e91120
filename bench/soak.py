#!/usr/bin/env python3
"""Soak: a bounded mix of hits, misses and pushes through two ociedge processes sharing one local
engine, while the upstream is cut off and restored (faults), then checks every pulled digest,
that no acknowledged push was lost, and that memory stayed flat.

usage: bench/soak.py [--minutes 10] [--workers 8] [--out bench/results]
Needs: a release build (cargo build --release), docker-registry and python3; uses
../shared/harness (registry.sh, delayproxy.py). Only 127.0.0.1; stops what it started.
"""
import argparse, datetime, hashlib, json, os, random, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request, urllib.error

from netutil import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.environ.get("OCIEDGE_HARNESS", os.path.join(os.path.dirname(ROOT), "shared", "harness"))
BIN = os.path.join(ROOT, "target", "release", "ociedge")


def http(method, url, body=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def push_blob(base, repo, data):
    """POST, then PUT ?digest= with the bytes (what Distribution and ociedge both take)."""
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    st, h, _ = http("POST", f"{base}/v2/{repo}/blobs/uploads/", b"")
    if st != 202:
        return None
    loc = h.get("Location") or h.get("location") or ""
    loc = loc if loc.startswith("http") else base + loc
    sep = "&" if "?" in loc else "?"
    st, _, _ = http("PUT", f"{loc}{sep}digest={d}", data, {"Content-Type": "application/octet-stream"})
    return d if st == 201 else None


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release")
    state = tempfile.mkdtemp(prefix="ociedge-soak-")
    env = dict(os.environ, HARNESS_STATE=state)
    procs = []
    stats = {"hits": 0, "misses": 0, "pushes": 0, "bad": 0, "failed": 0, "outages": 0}
    lock = threading.Lock()
    try:
        oport = free_port()
        subprocess.run(["bash", f"{HARNESS}/registry.sh", "start", "origin", str(oport)], env=env, check=True, capture_output=True)
        origin = f"http://127.0.0.1:{oport}"
        # The upstream is reached through a delay line the fault thread cuts and restores.
        dport = free_port()
        def delay_line():
            return subprocess.Popen([sys.executable, f"{HARNESS}/delayproxy.py", str(dport), str(oport), "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        line = [delay_line()]
        wait_port(dport)
        data_dir = os.path.join(state, "data")
        ports = [free_port(), free_port()]
        for p in ports:
            cfg = os.path.join(state, f"ociedge-{p}.yaml")
            with open(cfg, "w") as f:
                f.write(f"listen: 127.0.0.1:{p}\nregion: soak\nstorage:\n  preference: local\n  engines:\n"
                        f"    local: {{ url: \"file://{data_dir}\" }}\nupstreams:\n  - {{ name: docker.io, url: \"http://127.0.0.1:{dport}\" }}\n"
                        f"push: {{ engine: local }}\ncache: {{ tag_ttl: 5s, max_stale: 1h, max_size: 1GiB, min_idle: 30s }}\n")
            log = open(os.path.join(state, f"ociedge-{p}.log"), "w")
            procs.append(subprocess.Popen([BIN, "serve", "--config", cfg], stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, OCIEDGE_LOG="warn")))
        for p in ports:
            wait_port(p)
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        # Content in the upstream: a pool of blobs to pull (first a miss, then hits).
        pool = []
        for i in range(24):
            data = random.Random(i).randbytes(random.Random(i).randint(64 << 10, 8 << 20))
            d = push_blob(origin, "soak/pool", data)
            pool.append(d)
        acknowledged = []
        deadline = time.time() + a.minutes * 60
        rss = {p.pid: [] for p in procs}

        def worker(w):
            rnd = random.Random(1000 + w)
            n = 0
            while time.time() < deadline:
                base = rnd.choice(bases)
                kind = rnd.random()
                try:
                    if kind < 0.6:  # pull (miss the first time, hit after)
                        d = rnd.choice(pool)
                        st, h, body = http("GET", f"{base}/v2/soak/pool/blobs/{d}")
                        if st == 200:
                            ok = "sha256:" + hashlib.sha256(body).hexdigest() == d
                            with lock:
                                stats["hits" if h.get("x-ociedge-source") == "local" else "misses"] += 1
                                stats["bad"] += 0 if ok else 1
                        else:
                            with lock:
                                stats["failed"] += 1
                    elif kind < 0.7:  # a fresh miss
                        data = rnd.randbytes(rnd.randint(1 << 10, 256 << 10))
                        d = push_blob(origin, "soak/fresh", data)
                        st, h, body = http("GET", f"{base}/v2/soak/fresh/blobs/{d}")
                        with lock:
                            if st == 200:
                                stats["misses"] += 1
                                stats["bad"] += 0 if body == data else 1
                            else:
                                stats["failed"] += 1
                    else:  # a push
                        data = rnd.randbytes(rnd.randint(1 << 10, 128 << 10))
                        d = push_blob(base, f"soak/pushed{w}", data)
                        with lock:
                            if d:
                                stats["pushes"] += 1
                                acknowledged.append((f"soak/pushed{w}", d))
                            else:
                                stats["failed"] += 1
                except Exception:
                    with lock:
                        stats["failed"] += 1
                n += 1
                # Paced: the soak is about time under load and faults, not about filling the disk
                # (the local engine is capped by max_size; the origin is not).
                time.sleep(0.02)

        def faults():
            rnd = random.Random(7)
            while time.time() < deadline:
                time.sleep(rnd.uniform(20, 40))
                if time.time() >= deadline:
                    break
                line[0].terminate(); line[0].wait()
                with lock:
                    stats["outages"] += 1
                time.sleep(rnd.uniform(3, 8))
                line[0] = delay_line()

        def sampler():
            while time.time() < deadline:
                for p in procs:
                    rss[p.pid].append(rss_kib(p.pid))
                time.sleep(10)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(a.workers)]
        threads += [threading.Thread(target=faults), threading.Thread(target=sampler)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - started
        # Every acknowledged push is there, whole, through either process.
        lost = 0
        for repo, d in acknowledged:
            st, _, body = http("GET", f"{bases[0]}/v2/{repo}/blobs/{d}")
            if st != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != d:
                lost += 1
        alive = all(p.poll() is None for p in procs)
        lines = []
        flat = True
        for pid, samples in rss.items():
            half = samples[len(samples) // 2:] or samples
            growth = (max(half) - min(half)) / 1024 if half else 0
            flat = flat and growth < 64
            lines.append(f"| {pid} | {samples[0] // 1024 if samples else 0} | {max(samples) // 1024 if samples else 0} | {growth:.1f} |")
        verdict = stats["bad"] == 0 and lost == 0 and alive and flat
        out = [
            f"# Soak {datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M')}Z: {'PASS' if verdict else 'FAIL'}",
            "",
            f"{elapsed / 60:.1f} min, {a.workers} workers, 2 ociedge processes on one file:// engine capped at 1GiB, upstream cut {stats['outages']} times.",
            "",
            "| figure | value |", "|---|---|",
            f"| hits | {stats['hits']} |", f"| misses | {stats['misses']} |", f"| pushes acknowledged | {stats['pushes']} |",
            f"| failed requests (upstream cut) | {stats['failed']} |", f"| wrong bytes served cleanly | {stats['bad']} |",
            f"| acknowledged pushes lost | {lost} |", f"| processes alive at the end | {alive} |",
            "", "| pid | RSS start MiB | RSS max MiB | growth over 2nd half MiB |", "|---|---|---|---|", *lines, "",
        ]
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"{datetime.date.today().isoformat()}-soak.md")
        with open(path, "w") as f:
            f.write("\n".join(out))
        print("\n".join(out))
        print(f"written to {path}")
        sys.exit(0 if verdict else 1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            line[0].terminate()
        except Exception:
            pass
        subprocess.run(["bash", f"{HARNESS}/registry.sh", "stop", "origin"], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
