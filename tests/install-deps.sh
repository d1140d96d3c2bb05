#!/usr/bin/env bash
# Installs everything slirpy's tests need on a fresh Debian/Ubuntu machine: the system packages
# (apt, as root: directly, or through sudo for an ordinary user), then the Python packages into
# the checkout's virtual environment .venv (made here if README's first command has not made it).
# Debian's python3 is "externally managed" (PEP 668): pip installs only into a venv, never into
# the system. Run the tests afterwards with .venv/bin/python -m pytest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# python3-venv/python3-dev/gcc: the venv and python-pytun's C extension; the rest: namespaces,
# ping, udhcpc (busybox), tcpdump, the real clients (tests/test_e2e_clients.py) and the rootless
# user's tools, --enable-seccomp's libseccomp, and slirp4netns itself for comparison runs
apt_pkgs=(python3 python3-venv python3-dev gcc libc6-dev iproute2 iputils-ping util-linux
          busybox-static tcpdump procps libcap2-bin rootlesskit podman runc conmon uidmap
          fuse-overlayfs catatonit slirp4netns passwd acl libseccomp2)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "install-deps: missing Debian packages ${missing[*]}; run this script as root" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's own python3 (/usr/bin first): the interpreter a fresh machine has
[ -x .venv/bin/python ] || PATH="/usr/bin:$PATH" python3 -m venv .venv
# not -e: the tests run this checkout's slirpy through PYTHONPATH anyway, and an editable
# install's import hook is loaded by every python start in the venv (pathlib, urllib.parse,
# ipaddress: ~8 ms on each `slirpy --help`)
.venv/bin/python -m pip install -q --disable-pip-version-check '.[test,fuzz]'
# byte-compiled, as an installed package is (the daemon starts without compiling its sources)
.venv/bin/python -m compileall -q slirpy
