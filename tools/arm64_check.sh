#!/usr/bin/env bash
# Run edgelm's arm64 code paths on an emulated arm64 Debian (issue 16): a chosen subset of the suite and a greedy
# generation compared token for token with this (x86) machine's.
#
#   sudo-less root shell:  bash tools/arm64_check.sh [pytest args...]
#
# 1. Installs qemu-user-static, debootstrap and binfmt-support (Debian packages) if missing, and registers
#    qemu-aarch64 with binfmt_misc (flag F: the interpreter is opened at registration, so it works in a chroot).
# 2. Makes an arm64 Debian bookworm root with debootstrap --foreign, its second stage run under qemu-aarch64, then
#    Python and a venv with edgelm's dependencies from PyPI (aarch64 wheels of numpy, numba, llvmlite exist).
#    Cached in $EDGELM_ARM64_ROOT (default ~/.cache/edgelm-arm64/root): a second run starts at step 3.
# 3. Copies this checkout (tracked and untracked, not ignored files) and SmolLM2 (edgelm pull) into the root.
# 4. Runs there: tests/test_quant.py (every quant type bit-exact vs gguf.quants; matvec / matmul / get_rows of
#    every type), tests/test_kv_cache.py (compact KV caches, attention kernels), tests/test_rope.py,
#    tests/test_arm64_codegen.py, tests/test_convert.py's family tests (every tiny checkpoint vs transformers'
#    golden logits), then 32 greedy tokens of SmolLM2, compared with the same run here. Extra arguments go to
#    pytest (e.g. -k).
# Prints how long each step took. Needs root (chroot, mount) and the network (Debian mirror, PyPI).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${EDGELM_ARM64_ROOT:-$HOME/.cache/edgelm-arm64/root}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
t_all=$(date +%s)
step() { echo "== $(date +%T) $*"; }
took() { echo "   ($(( $(date +%s) - $1 )) s)"; }

# -- 1. the emulator ----------------------------------------------------------------------------------------------
t=$(date +%s); step "qemu-user and binfmt_misc"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
took "$t"

# -- 2. the arm64 root (cached) ------------------------------------------------------------------------------------
# a machine behind a TLS-inspecting proxy trusts its own CA bundle (PIP_CERT / SSL_CERT_FILE): the root gets a copy
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
ca_env=()
[ -n "$host_ca" ] && [ -f "$host_ca" ] && ca_env=(PIP_CERT=/etc/host-ca.crt SSL_CERT_FILE=/etc/host-ca.crt
                                                 REQUESTS_CA_BUNDLE=/etc/host-ca.crt)
in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
  LANG=C.UTF-8 NUMBA_CACHE_DIR=/root/.cache/numba PIP_DEFAULT_TIMEOUT=180 "${ca_env[@]}" "$@"; }
mounts() {
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  if [ ${#ca_env[@]} -gt 0 ]; then cp "$host_ca" "$root/etc/host-ca.crt"; fi
}
unmount() { umount "$root/dev" 2>/dev/null || true; umount "$root/proc" 2>/dev/null || true; }
trap unmount EXIT
trap 'unmount; exit 130' INT TERM     # a killed run (timeout, Ctrl-C) leaves no mounts behind
if [ ! -f "$root/.debootstrap-done" ]; then
  t=$(date +%s); step "debootstrap arm64 bookworm into $root (first run only)"
  rm -rf "$root"; mkdir -p "$root"
  debootstrap --arch=arm64 --variant=minbase --foreign \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" "$mirror" >/dev/null
  cp /usr/bin/qemu-aarch64-static "$root/usr/bin/"
  chroot "$root" /debootstrap/debootstrap --second-stage >/dev/null
  touch "$root/.debootstrap-done"
  took "$t"
fi
if [ ! -f "$root/.edgelm-ready" ]; then
  t=$(date +%s); step "Python venv with edgelm's dependencies (aarch64 wheels)"
  mounts
  in_root python3 -m venv /opt/venv
  in_root /opt/venv/bin/pip install -q --upgrade pip
  in_root /opt/venv/bin/pip install -q numpy numba gguf sentencepiece click psutil jinja2 regex pytest \
    fastapi uvicorn httptools openai httpx pexpect
  touch "$root/.edgelm-ready"
  took "$t"
fi
mounts
in_root python3 -c "import platform; print('   machine:', platform.machine())"

# -- 3. the checkout and a real model ------------------------------------------------------------------------------
t=$(date +%s); step "copy the checkout and SmolLM2"
rm -rf "$root/edgelm-src"; mkdir -p "$root/edgelm-src"
(cd "$here" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$root/edgelm-src" -xf -
model=$(cd "$here" && python3 -c "from edgelm.catalog import resolve; print(resolve('smollm2-135m'))")
mkdir -p "$root/root/.cache/edgelm/models"
cp -u "$model" "$root/root/.cache/edgelm/models/"
in_root /opt/venv/bin/pip install -q --no-deps -e /edgelm-src >/dev/null 2>&1
took "$t"

# -- 4. the chosen suite and a greedy generation ------------------------------------------------------------------
greedy='
import json, sys, edgelm
m = edgelm.load(sys.argv[1], n_ctx=256)
s = m.create_session()
logits = s.prefill(m.tokenize("The capital of France is"))
out = []
for _ in range(32):
    tok = int(logits.argmax()); out.append(tok); logits = s.decode(tok)
print(json.dumps(out))'
t=$(date +%s); step "pytest under emulation: quant types and kernels, KV caches and attention, RoPE, families vs transformers"
status=0
in_root /bin/sh -c "cd /edgelm-src && python -m pytest -q -p no:cacheprovider tests/test_quant.py \
  tests/test_kv_cache.py tests/test_rope.py tests/test_arm64_codegen.py tests/test_convert.py -k 'not cli' $*" \
  || status=$?
took "$t"
t=$(date +%s); step "SmolLM2: 32 greedy tokens, arm64 (emulated) vs this machine"
here_ids=$(cd "$here" && python3 -c "$greedy" "$model")
arm_ids=$(in_root python -c "$greedy" "/root/.cache/edgelm/models/$(basename "$model")")
echo "   x86:   $here_ids"
echo "   arm64: $arm_ids"
if [ "$here_ids" = "$arm_ids" ]; then echo "   identical"; else echo "   DIFFERENT"; status=1; fi
took "$t"
echo "== total $(( $(date +%s) - t_all )) s, status $status"
exit $status
