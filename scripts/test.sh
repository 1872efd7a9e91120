#!/usr/bin/env bash
# Installs what the test suite needs and runs all of it, the tests that drive real components
# (docker-registry, skopeo, podman, containerd, the Docker daemon, S3 servers, network namespaces,
# headless Chromium, promtool) included. Screenshots of the status page land in target/test-artifacts/.
#
#   scripts/test.sh [extra cargo test args]
#
# Needs root for apt-get (and for podman/containerd/namespaces in the tests), and a Rust toolchain
# (cargo >= 1.89). The harness scripts are taken from ../shared/harness, or from beside the
# checkout this one was cloned from (override with OCIEDGE_HARNESS).
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium draws the status page (tests/status_page.rs); prometheus brings promtool, which checks
# deploy/prometheus/ociedge-rules.yaml and the dashboard's queries (about 19 MB, no service is
# started in a container without systemd). apache2-utils (htpasswd -B) and openssl make the users
# and token keys of tests/access.rs.
pkgs=(docker-registry skopeo podman containerd docker.io jq python3 python3-venv curl iptables iproute2 chromium prometheus apache2-utils openssl)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "test.sh: cargo (Rust >= 1.89) is required" >&2; exit 1; }

# ../shared/harness beside this checkout, or beside the checkout this one was cloned from (a
# scratch clone such as `git clone . /tmp/x` has no ../shared of its own).
if [ -z "${OCIEDGE_HARNESS:-}" ]; then
  OCIEDGE_HARNESS="$(cd .. && pwd)/shared/harness"
  origin=$(git config --get remote.origin.url 2>/dev/null || true)
  if [ ! -f "$OCIEDGE_HARNESS/registry.sh" ] && [ -d "$origin" ]; then
    OCIEDGE_HARNESS="$(cd "$origin/.." && pwd)/shared/harness"
  fi
fi
export OCIEDGE_HARNESS
[ -f "$OCIEDGE_HARNESS/registry.sh" ] \
  || { echo "test.sh: harness not found at $OCIEDGE_HARNESS (set OCIEDGE_HARNESS)" >&2; exit 1; }

cargo test --locked "$@" -- --include-ignored
