#!/usr/bin/env bash
# Installs everything slirpy's tests need on a fresh Debian machine (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt_pkgs=(iproute2 iputils-ping util-linux busybox-static tcpdump procps libcap2-bin)
# the real clients (tests/test_e2e_clients.py), the rootless user's tools, --enable-seccomp's
# libseccomp, and slirp4netns itself for comparison runs
apt_pkgs+=(rootlesskit podman runc conmon uidmap fuse-overlayfs catatonit slirp4netns passwd acl
           libseccomp2)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,fuzz]'
