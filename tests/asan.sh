#!/bin/sh
# AddressSanitizer job (slow CI): builds vddk_ext with -fsanitize=address into a temporary
# directory and runs the vddk_ext tests (local backend, VDDK backend, loading, CLI) against that
# build with libasan preloaded into the interpreter. About a minute on 2 cores.
#
#   sh tests/asan.sh [extra pytest args]
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vddk-asan.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

cd "$src"
CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" LDFLAGS="-fsanitize=address" \
    "$python" setup.py -q build_ext --build-lib "$tmp/lib" --build-temp "$tmp/build" >/dev/null
cp vddk_ext/__init__.py vddk_ext/__init__.pyi vddk_ext/py.typed "$tmp/lib/vddk_ext/"
# The fake libvixDiskLib, built before libasan is preloaded (gcc itself is not under test).
sh tests/fake_vddk/build.sh "$tmp/fake" >/dev/null

libasan=$(gcc -print-file-name=libasan.so)
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1"
export PYTHONMALLOC=malloc          # Python's own allocations visible to ASan too
export FAKE_VDDK_PREBUILT="$tmp/fake"

# The current directory comes first on sys.path: `import vddk_ext` finds the ASan build.
cd "$tmp/lib"
"$python" - "$tmp/lib" <<'PY'
import sys, vddk_ext._vddk_ext as m
assert m.__file__.startswith(sys.argv[1]), f"not the ASan build: {m.__file__}"
PY
# RSS-stability tests are left out: ASan's quarantine keeps freed memory on purpose.
"$python" -m pytest -q -p no:cacheprovider --rootdir "$src" -k "not no_leak" \
    "$src/tests/test_vddk_ext_local.py" "$src/tests/test_vddk_ext_vddk.py" \
    "$src/tests/test_vddk_loading.py" "$src/tests/test_vddk_cli.py" "$@"
