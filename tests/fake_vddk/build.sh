#!/bin/sh
# Builds the fake libvixDiskLib variants into OUTDIR (default: tests/fake_vddk/build):
#   OUTDIR/full/lib64/libvixDiskLib.so.8     every function
#   OUTDIR/noquery/lib64/libvixDiskLib.so.8  without QueryAllocatedBlocks/FreeBlockList
#   OUTDIR/noasync/lib64/libvixDiskLib.so.8  without ReadAsync/WriteAsync/Wait
#   OUTDIR/broken/lib64/libvixDiskLib.so.8   without VixDiskLib_GetInfo (a required function)
#   OUTDIR/noaccess/lib64/libvixDiskLib.so.8 without PrepareForAccess/EndAccess
#   OUTDIR/flat/libvixDiskLib.so.7           no lib64/ directory, an older soname
# Pass the directory as --vddk-libdir / libdir=. Needs only gcc.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
src=$here/fake_vixdisklib.c
CC=${CC:-gcc}
flags="-O2 -g -std=gnu11 -Wall -Wextra -Werror -fPIC -shared -fvisibility=hidden -pthread"

build() {   # build DIR SONAME [DEFINES...]
    dir=$1 soname=$2
    shift 2
    mkdir -p "$dir"
    # build next to the target, then rename: a concurrent reader never sees a half-written file
    $CC $flags "$@" -Wl,-soname,"$soname" -o "$dir/.$soname.tmp.$$" "$src" -ldl
    mv -f "$dir/.$soname.tmp.$$" "$dir/$soname"
}

build "$out/full/lib64" libvixDiskLib.so.8
build "$out/noquery/lib64" libvixDiskLib.so.8 -DFAKE_NO_QUERY
build "$out/noasync/lib64" libvixDiskLib.so.8 -DFAKE_NO_ASYNC
build "$out/broken/lib64" libvixDiskLib.so.8 -DFAKE_BROKEN
build "$out/noaccess/lib64" libvixDiskLib.so.8 -DFAKE_NO_ACCESS
build "$out/flat" libvixDiskLib.so.7
echo "$out"
