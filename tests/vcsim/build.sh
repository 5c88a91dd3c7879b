#!/usr/bin/env bash
# Builds the vCenter simulator the vSphere tests talk to, from Debian's golang-go and
# golang-github-vmware-govmomi-dev only (offline, GOPATH mode). Prints the binary's path.
# The binary lands in a cache directory outside the work tree, named by the hash of the sources,
# so a second build is a no-op:  ${VCSIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/repo-engine/vcsim}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${VCSIM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/repo-engine/vcsim}"
gopath=/usr/share/gocode
if [ ! -d "$gopath/src/github.com/vmware/govmomi/simulator" ]; then
  echo "build.sh: govmomi sources missing: apt-get install golang-go golang-github-vmware-govmomi-dev" >&2
  exit 3
fi
command -v go >/dev/null || { echo "build.sh: no go compiler: apt-get install golang-go" >&2; exit 3; }
hash="$( (cat "$here"/*.go; go version) | sha256sum | cut -c1-16)"
out="$cache/vcsim-cbt-$hash"
if [ ! -x "$out" ]; then
  mkdir -p "$cache"
  tmp="$(mktemp "$cache/.build-XXXXXX")"
  trap 'rm -f "$tmp"' EXIT
  (cd "$here" && GO111MODULE=off GOPATH="$gopath" GOFLAGS= CGO_ENABLED=0 \
     GOCACHE="${GOCACHE:-$cache/go-build}" go build -o "$tmp" ./main.go)
  mv -f "$tmp" "$out"
fi
echo "$out"
