#!/usr/bin/env bash
# Quick start on a fresh Debian 12 machine: install repo-engine into ./.venv, then back up a demo
# disk image, change it, back it up again, restore both points and check them byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    gcc python3-dev python3-venv >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
export PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== demo disk: a 256 MiB sparse image with some files' bytes in it"
truncate -s 256M "$work/disk.img"
python3 - "$work/disk.img" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    for i, name in enumerate(sorted(os.listdir("/usr/bin"))[:400]):
        path = os.path.join("/usr/bin", name)
        if os.path.isfile(path):
            f.seek(i * 256 * 1024)
            f.write(open(path, "rb").read()[:200 * 1024])
PY
repo-engine init "$work/repo"
repo-engine backup image "$work/repo" --vm demo --disk sda="$work/disk.img" --tag first
cp --sparse=always "$work/disk.img" "$work/day1.img"

echo "== change 1 MiB at offset 64 MiB and record the changed extent"
head -c 1048576 /dev/urandom | dd of="$work/disk.img" bs=1M seek=64 conv=notrunc status=none
echo '[[67108864, 1048576]]' > "$work/changes.json"
repo-engine backup image "$work/repo" --vm demo --disk sda="$work/disk.img" \
  --changed sda="$work/changes.json" --tag second

echo "== restore both points and compare"
repo-engine points "$work/repo"
first=$(repo-engine points "$work/repo" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][0]["id"])')
repo-engine restore "$work/repo" "$first" --disk sda --to "$work/restored-1.img"
repo-engine restore "$work/repo" demo@latest --disk sda --to "$work/restored-2.img"
cmp "$work/day1.img" "$work/restored-1.img"
cmp "$work/disk.img" "$work/restored-2.img"
echo "both points restored byte for byte"
repo-engine stats "$work/repo"
