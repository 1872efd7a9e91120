#!/usr/bin/env python3
"""Georeplication bench: time to first byte of a miss served from the nearest of two delayed S3
engines, against the time to first byte of the same object fetched from that engine directly.
The aim: the engine's own latency plus a few milliseconds.

usage: bench/geo.py [--blobs 8] [--near-ms 5] [--far-ms 40] [--out bench/results]
Needs a release build (cargo build --release), docker-registry, curl, and moto (installed into
the harness venv on first use, as ../shared/harness/s3.sh does). Only 127.0.0.1.
"""
import argparse, datetime, hashlib, os, random, shutil, socket, statistics, subprocess, sys, tempfile, time, urllib.error, urllib.request

from netutil import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.environ.get("OCIEDGE_HARNESS", os.path.join(os.path.dirname(ROOT), "shared", "harness"))
BIN = os.path.join(ROOT, "target", "release", "ociedge")
TOOLS = os.environ.get("HARNESS_TOOLS", os.path.expanduser("~/.cache/ociedge-harness-tools"))


def moto_bin():
    b = os.path.join(TOOLS, "venv-moto", "bin", "moto_server")
    if not os.path.exists(b):
        subprocess.run([sys.executable, "-m", "venv", os.path.join(TOOLS, "venv-moto")], check=True)
        subprocess.run([os.path.join(TOOLS, "venv-moto", "bin", "pip"), "install", "-q", "moto[server]"], check=True)
    return b


def ttfb(args):
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_starttransfer}", *args], capture_output=True, text=True).stdout.split()
    if not out or out[0] != "200":
        raise SystemExit(f"curl {args[-1]} answered {out}")
    return float(out[1]) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=8)
    ap.add_argument("--near-ms", type=int, default=5)
    ap.add_argument("--far-ms", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release")
    state = tempfile.mkdtemp(prefix="ociedge-geo-")
    env = dict(os.environ, HARNESS_STATE=state)
    procs, regs = [], []
    try:
        mb = moto_bin()
        s3 = {}
        for name, delay in (("near", a.near_ms), ("far", a.far_ms)):
            port = free_port()
            procs.append(subprocess.Popen([mb, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port)
            subprocess.run(["curl", "-s", "-f", "-o", "/dev/null", "-X", "PUT", f"http://127.0.0.1:{port}/registry"], check=True)
            line = free_port()
            procs.append(subprocess.Popen([sys.executable, f"{HARNESS}/delayproxy.py", str(line), str(port), str(delay)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(line)
            rport = free_port()
            reg = f"{name}reg"
            subprocess.run(["bash", f"{HARNESS}/registry.sh", "start", reg, str(rport), "--s3", f"http://127.0.0.1:{port}", "registry"], env=env, check=True, capture_output=True)
            regs.append(reg)
            s3[name] = (port, line, f"http://127.0.0.1:{rport}")
        digests = []
        for i in range(a.blobs):
            data = random.Random(i).randbytes(4 << 20)
            d = "sha256:" + hashlib.sha256(data).hexdigest()
            for name in ("near", "far"):
                base = s3[name][2]
                # Distribution wants POST, then PUT ?digest= with the bytes.
                r = urllib.request.urlopen(urllib.request.Request(f"{base}/v2/geo/blob/blobs/uploads/", data=b"", method="POST"))
                loc = r.headers["Location"]
                loc = loc if loc.startswith("http") else base + loc
                sep = "&" if "?" in loc else "?"
                try:
                    urllib.request.urlopen(urllib.request.Request(f"{loc}{sep}digest={d}", data=data, method="PUT", headers={"Content-Type": "application/octet-stream"})).read()
                except urllib.error.HTTPError as e:
                    raise SystemExit(f"upload to the {name} registry failed: {e.code} {e.read()[:300]!r}")
            digests.append(d)
        oport = free_port()
        engine = lambda line: f'{{ url: "s3://registry", options: {{ endpoint: "http://127.0.0.1:{line}", region: us-east-1, access_key_id: k, secret_access_key: s, allow_http: "true" }} }}'
        cfg = os.path.join(state, "ociedge.yaml")
        with open(cfg, "w") as f:
            f.write(f"listen: 127.0.0.1:{oport}\nstorage:\n  preference: local\n  probe: {{ interval: 500ms }}\n  engines:\n"
                    f"    local: {{ url: \"file://{state}/data\" }}\n    near: {engine(s3['near'][1])}\n    far: {engine(s3['far'][1])}\n")
        procs.append(subprocess.Popen([BIN, "serve", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OCIEDGE_LOG="warn")))
        wait_port(oport)
        time.sleep(3)  # a few probe rounds
        via, direct = [], []
        for d in digests:
            hexd = d.split(":")[1]
            key = f"registry/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"
            direct.append(ttfb(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "k:s", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", f"http://127.0.0.1:{s3['near'][1]}/{key}"]))
            via.append(ttfb([f"http://127.0.0.1:{oport}/v2/geo/blob/blobs/{d}"]))
        mv, md = statistics.median(via), statistics.median(direct)
        out = [
            f"# Georeplication miss TTFB {datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M')}Z",
            "",
            f"Two moto S3 engines behind delay lines (near {a.near_ms} ms, far {a.far_ms} ms each way), {a.blobs} blobs of 4 MiB,",
            "each fetched once directly from the near engine (curl, SigV4) and once through ociedge as a cold miss.",
            "",
            "| figure | median ms | min | max |", "|---|---|---|---|",
            f"| direct from the near engine | {md:.1f} | {min(direct):.1f} | {max(direct):.1f} |",
            f"| ociedge miss (served from near) | {mv:.1f} | {min(via):.1f} | {max(via):.1f} |",
            f"| overhead | {mv - md:.1f} | | |",
            "",
        ]
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"{datetime.date.today().isoformat()}-geo.md")
        with open(path, "w") as f:
            f.write("\n".join(out))
        print("\n".join(out))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for r in regs:
            subprocess.run(["bash", f"{HARNESS}/registry.sh", "stop", r], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
