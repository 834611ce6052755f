#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test suite four ways:
#   release       all suites
#   python        `pip install .` into a venv over Debian's python3-torch,
#                 then the pytest suite (bindings/tests)
#   asan+ubsan    all suites under AddressSanitizer and UndefinedBehaviorSanitizer
#   tsan          the aio and pinned_pool suites under ThreadSanitizer
# Ends with one line "N passed, N failed, N skipped" over all of them and
# exits non-zero if anything failed. ZINF_TEST_VARIANTS="release" runs a
# subset; ZINF_JOBS sets build parallelism (default 2).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh || exit 1

jobs="${ZINF_JOBS:-2}"
variants="${ZINF_TEST_VARIANTS:-release python asan tsan}"
results=build-test-results
# Downloads from the Python registry are kept here between runs.
pip_cache="${ZINF_PIP_CACHE:-/var/tmp/zinf-pip-cache}"
rm -rf "$results"
mkdir -p "$results"
status=0

configure() {  # dir, meson options...
  local dir=$1
  shift
  if [[ ! -f $dir/build.ninja ]]; then
    meson setup "$dir" "$@" >"$results/$(basename "$dir")-setup.log" 2>&1 ||
      { cat "$results/$(basename "$dir")-setup.log"; return 1; }
  fi
  ninja -C "$dir" -j"$jobs" >"$results/$(basename "$dir")-build.log" 2>&1 ||
    { tail -50 "$results/$(basename "$dir")-build.log"; return 1; }
}

run_suites() {  # variant, build dir, meson test args...
  local variant=$1 dir=$2
  shift 2
  echo "== $variant: running tests"
  mkdir -p "$results/$variant"
  GTEST_OUTPUT="xml:$PWD/$results/$variant/" \
    meson test -C "$dir" --no-rebuild --print-errorlogs "$@" || status=1
  cp "$dir/meson-logs/testlog.json" "$results/$variant/testlog.json" 2>/dev/null || true
}

for variant in $variants; do
  case $variant in
    release)
      echo "== release: building"
      configure build --buildtype=release || { status=1; continue; }
      run_suites release build
      ;;
    python)
      # The package as a user installs it: meson-python builds the extension
      # against /usr/bin/python3, whose torch is Debian's python3-torch.
      echo "== python: pip install . (meson-python), then pytest"
      rm -rf build-py
      mkdir -p "$results/python"
      # Hugging Face transformers 4.40 (the last line that runs on torch
      # 1.13) for the tests that save through its Trainer.
      if /usr/bin/python3 -m venv --system-site-packages build-py/venv >"$results/python-install.log" 2>&1 &&
        build-py/venv/bin/python -m pip install --no-build-isolation --no-deps -v . \
          >>"$results/python-install.log" 2>&1 &&
        build-py/venv/bin/python -m pip install --cache-dir "$pip_cache" -q "transformers==4.40.2" \
          "accelerate==0.29.3" >>"$results/python-install.log" 2>&1; then
        (cd build-py && venv/bin/python -m pytest "$OLDPWD/bindings/tests" -q -p no:cacheprovider \
          --junitxml="$OLDPWD/$results/python/pytest.xml") || status=1
      else
        tail -50 "$results/python-install.log"
        status=1
      fi
      ;;
    asan)
      echo "== asan+ubsan: building"
      configure build-asan --buildtype=debugoptimized -Db_sanitize=address,undefined \
        -Db_lundef=false -Dbenchmarks=false -Dcpp_args=-fno-sanitize-recover=all ||
        { status=1; continue; }
      ASAN_OPTIONS=abort_on_error=1:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        run_suites asan build-asan
      ;;
    tsan)
      echo "== tsan: building"
      configure build-tsan --buildtype=debugoptimized -Db_sanitize=thread -Db_lundef=false \
        -Dtsan_subset=true -Dbenchmarks=false || { status=1; continue; }
      TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 run_suites tsan build-tsan
      ;;
    *)
      echo "unknown variant $variant" >&2
      status=1
      ;;
  esac
done

python3 scripts/count_results.py "$results" || status=1
exit $status
