#!/usr/bin/env bash
# The GPU check: one prepared run for a machine with an NVIDIA GPU, under
# 8 minutes, no editing. It configures zinf with CUDA and NCCL, builds, runs
# the GPU suites, the CPU optimizer suite natively (AVX-512 where the CPU has
# it), the strict-stand-in zero3 suites, measures the device tier
# (zinf-bench gpu: pinned copies against cudaMemcpy from cudaHostAlloc
# memory, NVMe -> pinned -> GPU streaming against the disk's own rate,
# fetch time hidden by prefetch) and runs zinf.torch.offload with
# device="cuda" against the plain module. Everything goes into one report,
# $OUT/gpu-check-report.md (or the path given as $1), with every step's log
# beside it.
#
#   bash scripts/gpu-check.sh --fetch-deps   # here, with network: the Debian
#                                            # dev packages a bare GPU image
#                                            # lacks, into .gpu-deps/ (~2 MB)
#   bash scripts/gpu-check.sh [REPORT]       # there (carry .gpu-deps)
#
# Where a library is missing on the GPU machine and .gpu-deps/ holds it, the
# packages are unpacked into a private sysroot (never into /) and the build
# finds them through PKG_CONFIG_SYSROOT_DIR. NCCL and its header come from
# the CUDA toolkit or from the nvidia-nccl Python package.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

deps=(liburing-dev liburing2 libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 nlohmann-json3-dev libcli11-dev
      libxxhash-dev libgtest-dev libgmock-dev pkgconf pkgconf-bin libpkgconf3)

if [[ ${1:-} == --fetch-deps ]]; then
  mkdir -p .gpu-deps
  grep -qx '/.gpu-deps/' .git/info/exclude 2>/dev/null || echo '/.gpu-deps/' >>.git/info/exclude
  (cd .gpu-deps && apt-get download "${deps[@]}") || exit 1
  du -sh .gpu-deps
  exit 0
fi

out_dir=${OUT:-$root/build-gpu-check}
mkdir -p "$out_dir"
report=${1:-$out_dir/gpu-check-report.md}
logs=$out_dir/gpu-check-logs
mkdir -p "$logs"
jobs=$(nproc)
began=$SECONDS
failures=0

{
  echo "# zinf GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found (no NVIDIA driver)"
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "AVX-512: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo missing)"
  echo "c++: $(c++ --version 2>/dev/null | head -1 || echo missing)"
  echo "python3: $(command -v python3) torch $(python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1 | tail -1)"
  echo '```'
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
} >"$report"

# step NAME COMMAND...: runs it, logs to $logs/NAME.log, adds a table row.
step() {
  local name=$1
  shift
  local start=$SECONDS result
  echo "== $name" >&2
  if "$@" >"$logs/$name.log" 2>&1; then
    result=ok
  else
    result="FAILED (exit $?; see gpu-check-logs/$name.log)"
    failures=$((failures + 1))
    tail -20 "$logs/$name.log" >&2
  fi
  echo "| $name | $result | $((SECONDS - start)) |" >>"$report"
}

# ---- dependencies ---------------------------------------------------------
sysroot=/tmp/zinf-gpu-sysroot
have_pc() { command -v pkg-config >/dev/null && pkg-config --exists "$@" 2>/dev/null; }
if ! have_pc liburing spdlog fmt nlohmann_json gtest; then
  if compgen -G ".gpu-deps/*.deb" >/dev/null; then
    echo "== unpacking .gpu-deps into $sysroot" >&2
    mkdir -p "$sysroot"
    for deb in .gpu-deps/*.deb; do dpkg -x "$deb" "$sysroot"; done
    export PATH=$sysroot/usr/bin:$PATH
    export LD_LIBRARY_PATH=$sysroot/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
    export PKG_CONFIG_SYSROOT_DIR=$sysroot
    export PKG_CONFIG_LIBDIR=$sysroot/usr/lib/x86_64-linux-gnu/pkgconfig:$sysroot/usr/share/pkgconfig:/usr/lib/x86_64-linux-gnu/pkgconfig:/usr/share/pkgconfig
    export CPATH=$sysroot/usr/include:${CPATH:-}
    export LIBRARY_PATH=$sysroot/usr/lib/x86_64-linux-gnu:${LIBRARY_PATH:-}
    # pkgconf reads its personality from the sysroot's copy.
    [[ -x $sysroot/usr/bin/pkgconf && ! -e $sysroot/usr/bin/pkg-config ]] && ln -s pkgconf "$sysroot/usr/bin/pkg-config"
  else
    echo "gpu-check: liburing/spdlog/fmt/nlohmann_json/gtest not found and no .gpu-deps/ (run --fetch-deps where the network is)" | tee -a "$report" >&2
  fi
fi
if [[ -z ${CUDA_PATH:-} ]] && command -v nvcc >/dev/null; then
  export CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")")
fi
if [[ ! -e ${CUDA_PATH:-/usr/local/cuda}/include/nccl.h ]]; then
  # The nvidia-nccl wheel torch depends on: header and library, and the
  # unversioned name the linker looks for.
  nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null ||
         python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
  if [[ -n $nccl && -d $nccl/lib ]]; then
    mkdir -p /tmp/zinf-nccl/lib
    ln -sf "$nccl"/lib/libnccl.so.* /tmp/zinf-nccl/lib/
    ln -sf "$(ls "$nccl"/lib/libnccl.so.* | head -1)" /tmp/zinf-nccl/lib/libnccl.so
    export CPATH=$nccl/include:${CPATH:-}
    export LIBRARY_PATH=/tmp/zinf-nccl/lib:${LIBRARY_PATH:-}
    export LD_LIBRARY_PATH=/tmp/zinf-nccl/lib:${LD_LIBRARY_PATH:-}
  fi
fi

# ---- build ----------------------------------------------------------------
build=build-gpu
rm -rf "$build"
step configure meson setup "$build" --buildtype=release -Dcuda=enabled -Dnccl=auto -Dbenchmarks=false \
  -Dexamples=false -Dpython=auto
step build ninja -C "$build" -j"$jobs"
grep -E "CUDA runtime|NCCL|Gloo|Python" "$logs/configure.log" | sed 's/^/    /' >>"$logs/summary.txt" 2>/dev/null

# ---- tests ----------------------------------------------------------------
step gpu-suites meson test -C "$build" --no-rebuild --suite gpu --print-errorlogs
# The CPU optimizer natively (the AVX-512 tier where this CPU has it), the
# device stand-ins and zero3 (its GPU-shaped tests on the strict stand-in).
step cpu-adam-native meson test -C "$build" --no-rebuild --suite cpu --print-errorlogs
step device-and-zero3 meson test -C "$build" --no-rebuild --suite device --suite zero3 --print-errorlogs

# ---- measurements ---------------------------------------------------------
scratch=${ZINF_BENCH_DIR:-/var/tmp}
step zinf-bench-gpu "$build/tools/zinf-bench" gpu --nvme "$scratch" --size 2G --shard 64M --repeat 3 \
  --json "$out_dir/gpu-bench.json"
step zinf-bench-io "$build/tools/zinf-bench" --no-progress --nvme "$scratch" --size 2G --repeat 2 \
  --json "$out_dir/io-bench.json"

# ---- Python: zinf.torch.offload and zinf.initialize on the GPU -------------
python_stage=/tmp/zinf-python
python_ready() {
  rm -rf "$python_stage" && mkdir -p "$python_stage/zinf" &&
    cp -r bindings/zinf/. "$python_stage/zinf/" &&
    cp "$build"/bindings/_zinf*.so "$python_stage/zinf/"
}
step python-stage python_ready
step python-tests env PYTHONPATH="$python_stage" ZINF_TEST_DIR="$scratch" python3 -m pytest -q -rs -p no:cacheprovider \
  bindings/tests/test_torch_offload_cuda.py bindings/tests/test_initialize_cuda.py bindings/tests/test_torch_offload.py \
  bindings/tests/test_deepspeed_compat.py bindings/tests/test_ops_accelerator.py bindings/tests/test_checkpointing.py

# ---- report -----------------------------------------------------------------
{
  echo
  echo "Total: $((SECONDS - began)) s, $failures step(s) failed."
  for log in zinf-bench-gpu zinf-bench-io gpu-suites python-tests; do
    echo
    echo "## $log"
    echo '```'
    grep -vE '^\[zinf (info|debug)\]' "$logs/$log.log" 2>/dev/null | tail -40
    echo '```'
  done
} >>"$report"
echo "gpu-check: report in $report ($failures failed)"
[[ $failures -eq 0 ]]
