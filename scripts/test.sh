#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test suite four ways:
#   release       all suites
#   python        `pip install --no-build-isolation .` into a venv over
#                 Debian's python3-torch (1.13) and transformers 4.40, then
#                 the pytest suite (bindings/tests)
#   python-newest the same in a venv of the python3 on PATH with the newest
#                 torch from the Python registry, installed with build
#                 isolation (newest meson-python) and without
#   fuzz          libFuzzer over every parser of outside bytes (scripts/fuzz.sh)
#   asan+ubsan    all suites under AddressSanitizer and UndefinedBehaviorSanitizer
#   tsan          the aio and pinned_pool suites under ThreadSanitizer
# Ends with one line "N passed, N failed, N skipped" over all of them and
# exits non-zero if anything failed. ZINF_TEST_VARIANTS="release" runs a
# subset; ZINF_JOBS sets build parallelism (default 2).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh || exit 1

jobs="${ZINF_JOBS:-2}"
variants="${ZINF_TEST_VARIANTS:-release python python-newest fuzz asan tsan}"
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
      echo "== python: /usr/bin/python3 (Debian's torch), pip install --no-build-isolation ., then pytest"
      rm -rf build-py
      mkdir -p "$results/python"
      if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
        echo "python: /usr/bin/python3 cannot import torch (install python3-torch: scripts/install-deps.sh)"
        status=1
        continue
      fi
      # Hugging Face transformers 4.40 (the last line that runs on torch
      # 1.13) for the tests that save through its Trainer.
      if /usr/bin/python3 -m venv --system-site-packages build-py/venv >"$results/python-install.log" 2>&1 &&
        build-py/venv/bin/python -m pip install --no-build-isolation --no-deps -v . \
          >>"$results/python-install.log" 2>&1 &&
        build-py/venv/bin/python -m pip install --cache-dir "$pip_cache" -q "transformers==4.40.2" \
          "accelerate==0.29.3" >>"$results/python-install.log" 2>&1; then
        (cd build-py && venv/bin/python -m pytest "$OLDPWD/bindings/tests" -q -rs -p no:cacheprovider \
          --junitxml="$OLDPWD/$results/python/pytest.xml") || status=1
      else
        tail -50 "$results/python-install.log"
        status=1
      fi
      ;;
    python-newest)
      # The package where most users are: a plain venv of the python3 on
      # PATH with the newest torch from the Python registry, `pip install .`
      # with build isolation (the newest meson-python, meson and pybind11),
      # then with --no-build-isolation over those same newest build tools;
      # the newest transformers (and peft) too, for the Hugging Face model tests.
      py=$(command -v python3)
      echo "== python-newest: $py, newest torch, pip install . (isolated, then --no-build-isolation), pytest"
      rm -rf build-py-newest
      mkdir -p "$results/python-newest"
      log="$results/python-newest-install.log"
      pip_in() { build-py-newest/venv/bin/python -m pip --cache-dir "$pip_cache" "$@" >>"$log" 2>&1; }
      if "$py" -m venv build-py-newest/venv >"$log" 2>&1 &&
        pip_in install -q torch numpy pytest transformers safetensors accelerate peft &&
        pip_in install -v . &&
        pip_in install -q meson-python meson ninja pybind11 &&
        pip_in install --no-build-isolation --no-deps --force-reinstall -v .; then
        build-py-newest/venv/bin/python -c 'import torch, zinf; print("python-newest: torch", torch.__version__, "zinf", zinf.__version__)'
        (cd build-py-newest && venv/bin/python -m pytest "$OLDPWD/bindings/tests" -q -rs -p no:cacheprovider \
          --junitxml="$OLDPWD/$results/python-newest/pytest.xml") || status=1
      else
        tail -50 "$log"
        status=1
      fi
      ;;
    fuzz)
      # Every parser of outside bytes under libFuzzer (clang) for a bounded
      # time: scripts/fuzz.sh writes one JUnit record per target.
      echo "== fuzz: libFuzzer over config, manifest, identity, safetensors (${ZINF_FUZZ_SECONDS:-20} s each)"
      bash scripts/fuzz.sh "$results/fuzz" || status=1
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
      # scripts/tsan-suppressions.txt says why each line is there.
      TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/scripts/tsan-suppressions.txt" \
        run_suites tsan build-tsan
      ;;
    *)
      echo "unknown variant $variant" >&2
      status=1
      ;;
  esac
done

python3 scripts/count_results.py "$results" || status=1
exit $status
