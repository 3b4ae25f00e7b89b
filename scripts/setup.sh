#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for pcn (run as root):
# apt packages, kernel headers where BCC looks for them, the virtualenv with
# Debian's bcc visible in it, and the project installed into it.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PCN_VENV:-$here/.venv}"
say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "pcn set-up must run as root (it installs packages and loads eBPF programs); try: sudo make ${1:-test}" >&2
    exit 1
fi

# 1. Debian packages: only touch apt when something is missing. (lua5.1 runs the
#    Argo CD health check in tests/test_manifests.py: Argo CD embeds Lua 5.1;
#    openssl makes the real-cluster lab's certificates, curl and util-linux's
#    nsenter probe it; tcpdump reads the pcap files of `kubectl pcn capture` in tests;
#    nftables is kube-proxy's nftables mode in the benchmarks, sockperf their TCP_RR
#    rate; gcc and libc6-dev build pcn-cni's static C launcher.)
pkgs=(python3 python3-venv python3-bpfcc bpfcc-tools linux-headers-6.12-amd64 iproute2
      iperf3 iputils-ping containernetworking-plugins iptables nftables sockperf ethtool
      lua5.1 openssl curl util-linux tcpdump gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi

# 2. Kernel headers: BCC compiles against /lib/modules/$(uname -r)/{build,source}.
#    The running kernel has no Debian headers; the 6.12 ones work. Never replace
#    headers that are already there.
mod="/lib/modules/$(uname -r)"
hdr_arch="$(ls -d /usr/src/linux-headers-6.12*-amd64 2>/dev/null | sort -V | tail -n1)"
hdr_common="$(ls -d /usr/src/linux-headers-6.12*-common 2>/dev/null | sort -V | tail -n1)"
if [ -z "$hdr_arch" ] || [ -z "$hdr_common" ]; then
    echo "linux-headers-6.12-amd64 is installed but /usr/src holds no 6.12 headers; reinstall it with: apt-get install --reinstall linux-headers-6.12-amd64" >&2
    exit 1
fi
mkdir -p "$mod"
if [ ! -e "$mod/build/Makefile" ]; then
    ln -sfn "$hdr_arch" "$mod/build"
    say "linked $mod/build -> $hdr_arch"
fi
if [ ! -e "$mod/source/include/linux/kconfig.h" ]; then
    ln -sfn "$hdr_common" "$mod/source"
    say "linked $mod/source -> $hdr_common"
fi

# 3. Virtualenv on Debian's Python 3.11 (python3-bpfcc is built for it), with
#    only the bcc package of the system made visible.
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    /usr/bin/python3 -m venv "$venv"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

# 4. The project, reinstalled only when its metadata changed.
stamp="$venv/.pcn-installed"
if [ ! -f "$stamp" ] || [ "$here/setup.cfg" -nt "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    say "installing pcn and its dependencies into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev]"
    touch "$stamp"
else
    say "pcn already installed in $venv"
fi
"$venv/bin/python" -c 'import bcc, pyroute2, pcn_agent, pcn_bpf' \
    || { echo "the virtualenv cannot import bcc/pyroute2/pcn_agent: remove $venv and run make again" >&2; exit 1; }

# 5. pcn-cni's C launcher (and its Python fallback) for the lab's kubelet
#    stand-in and the tests: $venv/lib/pcn-cni/pcn, rebuilt when launcher.c changes.
"$venv/bin/python" -c 'from pcn_lab.kubelet import cni_launcher; cni_launcher()' \
    || { echo "building pcn-cni's launcher failed (it needs gcc and libc6-dev)" >&2; exit 1; }
say "ready"
