#!/usr/bin/env bash
# Fuzzes every parser of outside bytes for a bounded time with libFuzzer
# (clang, from Debian's clang package), under ASan and UBSan:
#   config       the DeepSpeed JSON parser
#   manifest     a swap directory's manifest (zinf.manifest)
#   identity     a swap directory's identity file (zinf.store)
#   safetensors  16-bit weight checkpoints
# Seeds are in tests/fuzz/corpus/<target>/ (new finds go to a scratch copy,
# not the repo). ZINF_FUZZ_SECONDS per target (default 20). Writes a JUnit
# file per target under $1 (default build-fuzz/results) and exits non-zero
# when a target crashed; the crashing input is kept next to it.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${ZINF_FUZZ_SECONDS:-20}
results=${1:-build-fuzz/results}
out=build-fuzz
mkdir -p "$out" "$results"
cxx=${CLANGXX:-clang++}
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz: $cxx not found (apt-get install clang)" >&2
  exit 1
fi
# The project's own configure step (meson) writes zinf_config.h.
config_dir=$(dirname "$(ls build*/zinf_config.h 2>/dev/null | head -1)")
if [[ ! -f $config_dir/zinf_config.h ]]; then
  meson setup "$out/meson" -Dtests=false -Dbenchmarks=false -Dtools=false -Dexamples=false >/dev/null || exit 1
  config_dir=$out/meson
fi
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I. -I"$config_dir"
       -DSPDLOG_SHARED_LIB -DSPDLOG_COMPILED_LIB -DSPDLOG_FMT_EXTERNAL -w)
core=(core/config.cpp core/error.cpp core/log.cpp core/units.cpp core/atomic_file.cpp)
store=("${core[@]}" aio/completion.cpp aio/engine.cpp aio/file.cpp aio/thread_pool_engine.cpp aio/uring_engine.cpp
       aio/volume.cpp pinned_pool/pinned_pool.cpp pinned_pool/cuda_host_none.cpp swap/swap_store.cpp)
libs=(-lspdlog -lfmt -luring -lxxhash -lpthread)

build() {  # name, sources...
  local name=$1
  shift
  echo "fuzz: building $name" >&2
  "$cxx" "${flags[@]}" "$@" "${libs[@]}" -o "$out/fuzz_$name" >"$out/$name-build.log" 2>&1 ||
    { tail -30 "$out/$name-build.log" >&2; return 1; }
}

status=0
build config tests/fuzz/fuzz_config.cpp "${core[@]}" || status=1
build swap_store tests/fuzz/fuzz_swap_store.cpp "${store[@]}" || status=1
build safetensors tests/fuzz/fuzz_safetensors.cpp zero3/safetensors.cpp "${core[@]}" || status=1
[[ $status -eq 0 ]] || exit 1

run() {  # target, binary, env...
  local target=$1 binary=$2
  shift 2
  local corpus=$out/corpus/$target
  rm -rf "$corpus" && mkdir -p "$corpus" && cp tests/fuzz/corpus/"$target"/* "$corpus"/ 2>/dev/null
  echo "fuzz: $target for ${seconds}s" >&2
  local start=$SECONDS failure=""
  if ! env "$@" ASAN_OPTIONS=detect_leaks=1 "$out/$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$out/$target-" "$corpus" >"$out/$target.log" 2>&1; then
    failure=$(grep -m1 -E "ERROR|SUMMARY|deadly|timeout" "$out/$target.log" | sed 's/[<>&"]/ /g')
    tail -40 "$out/$target.log" >&2
    status=1
  fi
  local runs
  runs=$(grep -oE "Done [0-9]+ runs" "$out/$target.log" | grep -oE "[0-9]+" | tail -1)
  {
    echo "<testsuite name=\"fuzz\" tests=\"1\">"
    echo "  <testcase classname=\"fuzz\" name=\"$target (${runs:-0} inputs)\" time=\"$((SECONDS - start))\">"
    [[ -n $failure ]] && echo "    <failure message=\"$failure\"/>"
    echo "  </testcase>"
    echo "</testsuite>"
  } >"$results/fuzz_$target.xml"
  echo "fuzz: $target: ${runs:-0} inputs${failure:+, FAILED: $failure}" >&2
}

run config fuzz_config
run manifest fuzz_swap_store ZINF_FUZZ_FILE=manifest
run identity fuzz_swap_store ZINF_FUZZ_FILE=identity
run safetensors fuzz_safetensors
rm -rf "${ZINF_TEST_DIR:-/var/tmp}"/zinf-fuzz.* "${ZINF_TEST_DIR:-/var/tmp}"/zinf-fuzz-safetensors.*
exit $status
