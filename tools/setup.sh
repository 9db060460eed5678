#!/usr/bin/env bash
# Install what a fresh Debian 12 machine lacks for stratopy, then build the
# guest images (cached by content hash under ~/.cache/stratopy).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(linux-source-6.1 flex bison libelf-dev libssl-dev bc make gcc
              busybox-static e2fsprogs ncat socat qemu-system-x86 iproute2
              linux-libc-dev xz-utils iputils-ping cpio acpica-tools)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import stratopy, pytest, hypothesis, qemu.qmp, psutil' 2>/dev/null \
   || [ "$("$PY" -c 'import stratopy,os;print(os.path.dirname(stratopy.__file__))')" != "$PWD/stratopy" ]; then
  echo "setup: installing the stratopy package and its test dependencies" >&2
  "$PY" -m pip install -q -e '.[test]' --config-settings editable_mode=compat
fi

# Bytecode, as an installed package has it: without it every `stratopy`
# start compiles the sources first (~100 ms; this workplace also sets
# PYTHONDONTWRITEBYTECODE, so Python would never cache it by itself).
"$PY" -m compileall -q stratopy

echo "setup: guest images" >&2
"$PY" -m stratopy.guest
"$PY" tests/guests/build.py >/dev/null
echo "setup: done" >&2
