#!/usr/bin/env bash
# The main job: install what is missing, build, and profile a scratch
# directory with zinf-bench. Arguments go to zinf-bench, e.g.
#   bash scripts/bench.sh --nvme /mnt/nvme0 /mnt/nvme1 --sweep
# With no --nvme it measures $ZINF_BENCH_DIR or /var/tmp.
# Build progress goes to stderr (one line per step); a failing step prints
# its log and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
log=$(mktemp "${TMPDIR:-/tmp}/zinf-bench-build.XXXXXX")
trap 'rm -f "$log"' EXIT
if [[ ! -f build/build.ninja ]]; then
  echo "bench.sh: configuring build/ (meson, release)" >&2
  if ! meson setup build --buildtype=release >"$log" 2>&1; then
    cat "$log" >&2
    echo "bench.sh: meson setup failed (log above)" >&2
    exit 1
  fi
fi
echo "bench.sh: building zinf-bench (ninja -C build, -j${ZINF_JOBS:-2})" >&2
# ninja's own progress lines ([12/40] Compiling ...), errors in full.
if ! ninja -C build -j"${ZINF_JOBS:-2}" tools/zinf-bench >&2; then
  echo "bench.sh: the build failed (errors above)" >&2
  exit 1
fi
exec build/tools/zinf-bench "$@"
