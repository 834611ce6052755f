#!/usr/bin/env bash
# Installs what zinf needs to build, test and benchmark, from Debian's
# packages, skipping what is already there. Run as root (or with sudo).
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config python3
  liburing-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libxxhash-dev
  libgtest-dev libbenchmark-dev
  libgloo-dev libtorch-dev
  pybind11-dev python3-mesonpy python3-pytest python3-torch python3-venv patchelf
  fio e2fsprogs util-linux python3-pip clang
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done

if ((${#missing[@]} > 0)); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# tests/emulated runs the AVX-512 kernels in the Bochs CPU emulator, from PyPI,
# installed into the Python meson finds (the first python3 on PATH).
if ! python3 -m pip show bochscpu-python 2>/dev/null | grep -x 'Version: 0.4.0' >/dev/null; then
  echo "install-deps: installing bochscpu-python==0.4.0 (pip)"
  python3 -m pip install -q bochscpu-python==0.4.0 ||
    python3 -m pip install -q --break-system-packages bochscpu-python==0.4.0
fi
