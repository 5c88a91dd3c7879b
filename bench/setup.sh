#!/bin/sh
# Install the benchmark's peer tools and helpers (Debian 12, as root).
# Loop mounts work in this sandbox, so fuse2fs is not needed by bench/workload.py.
set -eu
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    restic borgbackup casync b3sum zstd time e2fsprogs mount util-linux diffutils
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install 'numpy>=1.26'
