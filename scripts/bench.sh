#!/usr/bin/env bash
# The main job: install what is missing, build, and profile a scratch
# directory with zinf-bench. Arguments go to zinf-bench, e.g.
#   bash scripts/bench.sh --nvme /mnt/nvme0 /mnt/nvme1 --sweep
# With no --nvme it measures $ZINF_BENCH_DIR or /var/tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [[ ! -f build/build.ninja ]]; then
  meson setup build --buildtype=release >/dev/null
fi
ninja -C build -j"${ZINF_JOBS:-2}" tools/zinf-bench >/dev/null
exec build/tools/zinf-bench "$@"
