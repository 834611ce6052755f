#!/usr/bin/env python3
"""Runs zinf's AVX-512 optimizer kernels on an emulated CPU and checks that
they give the scalar tier's results, on machines without AVX-512.

The guest (avx512_guest.cpp, linked with the kernel-tier archives meson
builds for zinf, no OS and no runtime) runs in bochscpu, the Bochs x86-64
emulator, whose default CPU model (Tiger Lake) has AVX-512 F/BW/VL/DQ. The
same job images (emu_job.hpp) run natively in avx512_emulated_reference with
the scalar tier. The rule is the one tests/cpu_adam_test.cpp holds the AVX2
tier to: the same bits, or NaN in both (NaN payloads may differ by tier).

Also checked: the emulated CPU reports AVX-512 F/BW/VL/DQ the way
cpu_features.cpp reads it, and the emulator itself, by running the scalar and
AVX2 tiers in it and comparing them with the same tiers run natively.

    avx512_emulated_test.py --guest ELF --reference EXE [--shim SO] [--quick]

With GTEST_OUTPUT=xml:DIR/ it writes DIR/avx512_emulated_test.xml, a
GoogleTest-style report with one testcase per case. Exit status: 0 all
passed, 1 something failed, 77 (meson's "skipped") when the emulator is not
installed (pip install bochscpu-python==0.4.0).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import mmap
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
import zlib
from array import array
from dataclasses import dataclass, field

REPORT_NAME = "avx512_emulated_test"

# ------------------------------------------------------------------ results


@dataclass
class Case:
    suite: str
    name: str
    status: str = "passed"  # passed, failed, skipped
    message: str = ""
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Report:
    def __init__(self) -> None:
        self.cases: list[Case] = []
        self.started = datetime.datetime.now()

    def add(self, case: Case) -> None:
        self.cases.append(case)
        label = {"passed": "OK", "failed": "FAILED", "skipped": "SKIPPED"}[case.status]
        line = f"[{label:>7}] {case.suite}.{case.name} ({case.seconds * 1000:.0f} ms)"
        if case.status != "passed":
            line += f": {case.message}"
        print(line, flush=True)
        for detail in case.details[:40]:
            print(f"          {detail}", flush=True)

    def counts(self) -> tuple[int, int, int]:
        passed = sum(c.status == "passed" for c in self.cases)
        failed = sum(c.status == "failed" for c in self.cases)
        return passed, failed, len(self.cases) - passed - failed

    def write_xml(self, path: str) -> None:
        """GoogleTest's XML report layout, which scripts/count_results.py reads."""
        total = time.time() - self.started.timestamp()
        root = ElementTree.Element("testsuites")
        suites: dict[str, list[Case]] = {}
        for case in self.cases:
            suites.setdefault(case.suite, []).append(case)
        passed, failed, skipped = self.counts()
        root.attrib.update(tests=str(len(self.cases)), failures=str(failed), disabled="0",
                           errors="0", time=f"{total:.3f}",
                           timestamp=self.started.isoformat(timespec="seconds"), name="AllTests")
        for suite_name, cases in suites.items():
            suite = ElementTree.SubElement(root, "testsuite")
            suite.attrib.update(
                name=suite_name, tests=str(len(cases)),
                failures=str(sum(c.status == "failed" for c in cases)), disabled="0",
                skipped=str(sum(c.status == "skipped" for c in cases)), errors="0",
                time=f"{sum(c.seconds for c in cases):.3f}",
                timestamp=self.started.isoformat(timespec="seconds"))
            for case in cases:
                element = ElementTree.SubElement(suite, "testcase")
                element.attrib.update(
                    name=case.name, status="run",
                    result="skipped" if case.status == "skipped" else "completed",
                    time=f"{case.seconds:.3f}",
                    timestamp=self.started.isoformat(timespec="seconds"), classname=suite_name)
                if case.status == "failed":
                    failure = ElementTree.SubElement(element, "failure")
                    failure.attrib.update(message=case.message, type="")
                    failure.text = "\n".join([case.message] + case.details)
                elif case.status == "skipped":
                    ElementTree.SubElement(element, "skipped").attrib["message"] = case.message
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        ElementTree.ElementTree(root).write(path, encoding="UTF-8", xml_declaration=True)


def report_path() -> str | None:
    """Where GoogleTest would write, from GTEST_OUTPUT ("xml", "xml:FILE", "xml:DIR/")."""
    value = os.environ.get("GTEST_OUTPUT", "")
    if not value.startswith("xml"):
        return None
    target = value[4:] if value.startswith("xml:") else ""
    if not target:
        return "test_detail.xml"
    if target.endswith(("/", os.sep)):
        return os.path.join(target, REPORT_NAME + ".xml")
    return target


# ------------------------------------------------------------ float formats

F32, BF16, F16 = 0, 1, 2
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_SIZES = (4, 2, 2)
COPY_NAMES = ("none", "bf16", "fp16")


def f32(x: float) -> float:
    """x rounded to float, as a C++ static_cast<float> does."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32_to_bf16(bits: int) -> int:
    """Round to nearest even; NaN stays a quiet NaN (dtype_convert.inc's rule)."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return ((bits >> 16) | 0x40) & 0xFFFF
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def f32_to_f16(bits: int) -> int:
    """Round to nearest even with subnormals, NaN quiet (dtype_convert.inc's rule)."""
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    if magnitude > 0x7F800000:
        return sign | 0x7E00 | ((magnitude & 0x7FFFFF) >> 13)
    if magnitude >= 0x477FF000:
        return sign | 0x7C00
    if magnitude >= 0x38800000:
        return sign | ((magnitude + 0xFFF + ((magnitude >> 13) & 1) - 0x38000000) >> 13)
    if magnitude < 0x33000000:
        return sign
    exponent = magnitude >> 23
    mantissa = (magnitude & 0x7FFFFF) | 0x800000
    shift = 126 - exponent
    kept, rest, half = mantissa >> shift, mantissa & ((1 << shift) - 1), 1 << (shift - 1)
    return sign | (kept + (1 if rest > half or (rest == half and kept & 1) else 0))


def bf16_value(bits: int) -> float:
    return bits_f32(bits << 16)


def f16_value(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def is_nan(dtype: int, bits: int) -> bool:
    if dtype == F32:
        return (bits & 0x7FFFFFFF) > 0x7F800000
    if dtype == BF16:
        return (bits & 0x7FFF) > 0x7F80
    return (bits & 0x7FFF) > 0x7C00


def value_of(dtype: int, bits: int) -> float:
    return (bits_f32, bf16_value, f16_value)[dtype](bits)


def encode(dtype: int, f32_bit_patterns: list[int]) -> list[int]:
    if dtype == F32:
        return list(f32_bit_patterns)
    convert = f32_to_bf16 if dtype == BF16 else f32_to_f16
    return [convert(b) for b in f32_bit_patterns]


def pack(dtype: int, values: list[int]) -> bytes:
    return array("I" if dtype == F32 else "H", values).tobytes()


def unpack(dtype: int, data: bytes) -> list[int]:
    return list(array("I" if dtype == F32 else "H", data))


def describe(dtype: int, bits: int) -> str:
    width = 8 if dtype == F32 else 4
    return f"0x{bits:0{width}x} ({value_of(dtype, bits)!r})"


# ------------------------------------------------------------ job images
# Mirrors emu_job.hpp (its static_asserts pin these offsets).
JOB_MAGIC = 0x554D455A
KIND_PROBE, KIND_ADAM, KIND_ADAGRAD, KIND_LION, KIND_BANDWIDTH = range(5)
KIND_NAMES = {KIND_ADAM: "adam", KIND_ADAGRAD: "adagrad", KIND_LION: "lion",
              KIND_BANDWIDTH: "bandwidth"}
TIER_SCALAR, TIER_AVX2, TIER_AVX512 = range(3)
TIER_NAMES = ("scalar", "avx2", "avx512")
MAX_STEPS = 4
HEADER_SIZE = 512
OFF_ADAM, OFF_ADAGRAD, OFF_LION = 96, 256, 320
OFF_STATUS, OFF_STEPS_DONE, OFF_TABLE_NAME = 432, 436, 440
OFF_CPUID1, OFF_CPUID7_0, OFF_CPUID7_1, OFF_XCR0 = 456, 472, 488, 504
STATUS_NAMES = {-1: "not run", 0: "done", 1: "bad magic", 2: "bad job",
                3: "no kernel for this dtype combination", 4: "tier not in this program"}
GUARD = 64  # bytes of sentinel before and after every tensor
TAIL = 5  # elements after `end` that no call may touch
GUARD_BYTE = 0xA5


@dataclass
class Tensor:
    name: str
    dtype: int
    offset: int  # byte offset of element 0 in the image
    count: int  # elements laid out (every one is compared)


@dataclass
class Job:
    label: str
    kind: int
    tier: int
    combo: tuple[int, int, int, int]
    steps: int
    begin: int
    end: int
    image: bytes
    tensors: list[Tensor]


def align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def adam_scalars(lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, step) -> bytes:
    """AdamScalars as CpuOptimizer::adam_step computes them (double, then float)."""
    lr, beta1, beta2, eps, weight_decay = map(f32, (lr, beta1, beta2, eps, weight_decay))
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = math.sqrt(1.0 - beta2 ** step) if bias_correction else 1.0
    return struct.pack("<9f2?2x", beta1, beta2, f32(1.0 - beta1), f32(1.0 - beta2), eps,
                       weight_decay, f32(1.0 - lr * weight_decay), f32(lr / bc1), f32(1.0 / bc2),
                       adamw, weight_decay > 0)


def adagrad_scalars(lr, eps, weight_decay) -> bytes:
    lr, eps, weight_decay = map(f32, (lr, eps, weight_decay))
    return struct.pack("<3f?3x", lr, eps, weight_decay, weight_decay > 0)


def lion_scalars(lr, beta1, beta2, weight_decay) -> bytes:
    lr, beta1, beta2, weight_decay = map(f32, (lr, beta1, beta2, weight_decay))
    return struct.pack("<6f?3x", lr, beta1, beta2, f32(1.0 - beta1), f32(1.0 - beta2),
                       f32(1.0 - lr * weight_decay), weight_decay > 0)


@dataclass
class Optimizer:
    """One optimizer configuration, as its per-step scalar blocks."""
    name: str
    kind: int
    scalars: object  # step (1-based) -> bytes

    def block(self, steps: int) -> tuple[int, bytes]:
        blocks = [self.scalars(t) for t in range(1, steps + 1)]
        size = {KIND_ADAM: 40, KIND_ADAGRAD: 16, KIND_LION: 28, KIND_BANDWIDTH: 0}[self.kind]
        offset = {KIND_ADAM: OFF_ADAM, KIND_ADAGRAD: OFF_ADAGRAD, KIND_LION: OFF_LION,
                  KIND_BANDWIDTH: OFF_ADAM}[self.kind]
        data = b"".join(blocks) if size else b""
        return offset, data + bytes(size * (MAX_STEPS - steps))


OPTIMIZERS = [
    # The same hyper-parameters as tests/cpu_adam_test.cpp where it has them.
    Optimizer("AdamL2", KIND_ADAM,
              lambda t: adam_scalars(1e-2, 0.9, 0.999, 1e-8, 0.01, False, True, t)),
    Optimizer("AdamW", KIND_ADAM,
              lambda t: adam_scalars(1e-2, 0.9, 0.999, 1e-8, 0.01, True, True, t)),
    Optimizer("AdamNoBiasCorrectionNoDecay", KIND_ADAM,
              lambda t: adam_scalars(1e-2, 0.9, 0.999, 1e-8, 0.0, False, False, t)),
    Optimizer("AdamWNoBiasCorrection", KIND_ADAM,
              lambda t: adam_scalars(1e-3, 0.8, 0.95, 1e-6, 0.1, True, False, t)),
    Optimizer("Adagrad", KIND_ADAGRAD, lambda t: adagrad_scalars(0.05, 1e-10, 0.01)),
    Optimizer("AdagradNoDecay", KIND_ADAGRAD, lambda t: adagrad_scalars(0.05, 1e-10, 0.0)),
    Optimizer("Lion", KIND_LION, lambda t: lion_scalars(1e-3, 0.9, 0.99, 0.1)),
    Optimizer("LionNoDecay", KIND_LION, lambda t: lion_scalars(1e-4, 0.95, 0.98, 0.0)),
    Optimizer("Bandwidth", KIND_BANDWIDTH, lambda t: b""),
]


def supported_combos() -> list[tuple[int, int, int, int]]:
    """kernels_impl.inc's supported(): (param, grad, state, copy)."""
    combos = [(F32, g, F32, c) for g in (F32, BF16, F16) for c in (0, 1, 2)]
    for p in (BF16, F16):
        combos += [(p, g, s, 0) for s in (p, F32) for g in (p, F32)]
    return combos


def combo_name(combo: tuple[int, int, int, int]) -> str:
    p, g, s, c = combo
    return (f"param_{DTYPE_NAMES[p]}_grad_{DTYPE_NAMES[g]}_state_{DTYPE_NAMES[s]}"
            f"_copy_{COPY_NAMES[c]}")


# 16-bit patterns no float32 rounds to (signalling NaN, NaN payloads) and
# edges of the 16-bit formats themselves, for loads of bf16/fp16 tensors.
RAW16 = {
    BF16: [0x0001, 0x007F, 0x8080, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF,
           0x0080, 0x3F80, 0x8001],
    F16: [0x0001, 0x03FF, 0x8200, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x7D00,
          0xFE01, 0x3C00, 0x8001],
}


def encode_tensor(dtype: int, f32_bit_patterns: list[int], raw16_stride: int) -> list[int]:
    values = encode(dtype, f32_bit_patterns)
    if raw16_stride and dtype != F32:
        raw = RAW16[dtype]
        for i in range(raw16_stride - 1, len(values), raw16_stride):
            values[i] = raw[(i // raw16_stride) % len(raw)]
    return values


def build_job(label: str, optimizer: Optimizer, tier: int, combo, steps: int, begin: int,
              end: int, misalign: int, values: dict[str, list[int]],
              raw16_stride: int = 0) -> Job:
    """values: f32 bit patterns per tensor ("param", "grad0".., "exp_avg", "exp_avg_sq"),
    `end + TAIL` of each, converted here to the tensor's dtype; with
    raw16_stride, every raw16_stride-th element of a 16-bit tensor is one of
    RAW16 instead."""
    p, g, s, c = combo
    count = end + TAIL
    cursor = HEADER_SIZE
    tensors: list[Tensor] = []
    body = bytearray()

    def place(name: str, dtype: int, data: bytes) -> int:
        nonlocal cursor
        start = align(cursor + GUARD, 64) + misalign * DTYPE_SIZES[dtype]
        body.extend(bytes([GUARD_BYTE]) * (start - cursor))
        body.extend(data)
        cursor = start + len(data)
        tensors.append(Tensor(name, dtype, start, len(data) // DTYPE_SIZES[dtype]))
        return start

    param = place("param", p, pack(p, encode_tensor(p, values["param"][:count], raw16_stride)))
    grad = grad_step = 0
    for k in range(steps):
        offset = place(f"grad (step {k + 1})", g, pack(g, encode_tensor(g, values[f"grad{k}"][:count], raw16_stride)))
        if k == 0:
            grad = offset
        elif k == 1:
            grad_step = offset - grad
        elif offset - grad != k * grad_step:
            raise AssertionError("grad arrays not evenly spaced")
    exp_avg = place("exp_avg", s, pack(s, encode_tensor(s, values["exp_avg"][:count], raw16_stride)))
    exp_avg_sq = place("exp_avg_sq", s, pack(s, encode_tensor(s, values["exp_avg_sq"][:count], raw16_stride)))
    copy = place("param_copy", c, pack(c, [0x5A5A] * count)) if c else 0
    body.extend(bytes([GUARD_BYTE]) * GUARD)
    offset, scalars = optimizer.block(steps)
    header = bytearray(HEADER_SIZE)
    struct.pack_into("<8I2Q6Q", header, 0, JOB_MAGIC, optimizer.kind, tier, p, g, s, c, steps,
                     begin, end, param, grad, exp_avg, exp_avg_sq, copy, grad_step)
    header[offset:offset + len(scalars)] = scalars
    struct.pack_into("<iI", header, OFF_STATUS, -1, 0)
    image = bytes(header) + bytes(body)
    return Job(label, optimizer.kind, tier, combo, steps, begin, end, image, tensors)


def probe_job() -> Job:
    header = bytearray(HEADER_SIZE)
    struct.pack_into("<8I", header, 0, JOB_MAGIC, KIND_PROBE, TIER_AVX512, 0, 0, 0, 0, 0)
    struct.pack_into("<i", header, OFF_STATUS, -1)
    return Job("probe", KIND_PROBE, TIER_AVX512, (0, 0, 0, 0), 0, 0, 0, bytes(header), [])


# ------------------------------------------------------------ input values

# float32 bit patterns: the special values of cpu_adam_test.cpp's
# SpecialValuesGiveTheScalarBits, then rounding edges of the bf16 and fp16
# conversions (ties, carries into the exponent, overflow to inf, subnormals,
# signalling NaN with payload).
SPECIALS = [f32_bits(x) for x in (0.0, -0.0, 1e-40, -1e-40, 1e-30, 3e38, -3e38, 1.0, -1.0,
                                  65504.0, 65520.0, 6e-8, 1e-45)]
SPECIALS += [0x7F800000, 0xFF800000, 0x7FC00000]  # inf, -inf, quiet NaN
SPECIALS += [
    0x3F808000, 0x3F818000, 0x3F808001, 0xBF80FFFF,  # bf16: tie to even, tie up, above, carry
    0x7F7FFFFF, 0x7F7F8000, 0x00018000, 0x00008000,  # bf16: to inf, tie to inf?, subnormal ties
    0x80000001, 0x7F800001, 0xFFC12345, 0xFFBFFFFF,  # -tiny, sNaN, NaN payloads
    0x477FEFFF, 0x477FF000, 0x33800000, 0x33000000,  # fp16: below/at the inf tie, subnormal edges
    0x33400000, 0x387FE000, 0x38800000, 0x387FF000,  # fp16: 3/4 subnormal, into normals
    0x7F812345, 0x3F801000, 0x3F803000, 0xC77FE000,  # fp16 NaN payload, fp16 ties, big negative
]


_POOLS: dict[str, list[int]] = {}


def pools() -> dict[str, list[int]]:
    """float32 bits of normal draws scaled as cpu_adam_test.cpp's Tensor
    scales them (params N(0,1), exp_avg 0.01 N, exp_avg_sq 1e-4 |N|, grads
    0.1 N), made once; jobs take slices at seed-chosen places, which is much
    faster than drawing per job."""
    if not _POOLS:
        rng = random.Random(20240229)
        normal = [rng.gauss(0.0, 1.0) for _ in range(1 << 16)]
        _POOLS["param"] = [f32_bits(x) for x in normal]
        _POOLS["exp_avg"] = [f32_bits(x * 0.01) for x in normal]
        _POOLS["exp_avg_sq"] = [f32_bits(abs(x) * 1e-4) for x in normal]
        _POOLS["grad"] = [f32_bits(x * 0.1) for x in normal]
    return _POOLS


def random_values(count: int, seed: int) -> dict[str, list[int]]:
    """Normal values as cpu_adam_test.cpp's Tensor makes them, with zero, -0
    and 1e-30 grads sprinkled in (in different places at each step)."""
    rng = random.Random(seed)

    def draw(name: str) -> list[int]:
        pool = pools()[name]
        start = rng.randrange(len(pool) - count)
        return pool[start:start + count]

    values = {name: draw(name) for name in ("param", "exp_avg", "exp_avg_sq")}
    tiny = f32_bits(1e-30)
    for k in range(MAX_STEPS):
        grads = draw("grad")
        for i in range(count):
            if (i + k) % 97 == 3:
                grads[i] = 0x00000000
            elif (i + k) % 101 == 5:
                grads[i] = 0x80000000
            elif (i + k) % 103 == 7:
                grads[i] = tiny
        values[f"grad{k}"] = grads
    return values


def special_values(count: int, seed: int) -> dict[str, list[int]]:
    """Every special against every special (param x grad), states random."""
    n = len(SPECIALS)
    values = random_values(count, seed)
    values["param"] = [SPECIALS[(i // n) % n] for i in range(count)]
    for k in range(MAX_STEPS):
        values[f"grad{k}"] = [SPECIALS[(i + k) % n] for i in range(count)]
    return values


def special_states(count: int, seed: int) -> dict[str, list[int]]:
    """Specials in the optimizer states too (negative, NaN, inf, subnormal m and v)."""
    values = special_values(count, seed)
    n = len(SPECIALS)
    values["exp_avg"] = [SPECIALS[(i * 7 + 3) % n] for i in range(count)]
    values["exp_avg_sq"] = [SPECIALS[(i * 13 + 5) % n] for i in range(count)]
    values["grad0"] = [SPECIALS[(i * 5 + 1) % n] for i in range(count)]
    return values


# (length, begin, misalign in elements): odd lengths, ranges that start in the
# middle of a 16-lane vector, base pointers off 64-byte alignment, tails.
RANGES = [
    (1, 0, 0), (1, 5, 1), (15, 0, 1), (15, 1, 0), (16, 0, 0), (16, 13, 3), (17, 0, 3),
    (17, 3, 1), (31, 0, 0), (31, 9, 2), (33, 0, 1), (33, 15, 0), (257, 0, 0), (257, 7, 3),
    (1007, 0, 2), (1007, 1, 1), (4099, 2, 1),
]
QUICK_RANGES = [(17, 3, 1), (33, 15, 0), (257, 7, 3)]
STEPS = 3


def stable_seed(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclass
class TestPlan:
    suite: str
    name: str
    jobs: list[Job]
    reference_tier: int


def plan(quick: bool) -> list[TestPlan]:
    plans: list[TestPlan] = []
    ranges = QUICK_RANGES if quick else RANGES
    special_count = len(SPECIALS) ** 2
    for optimizer in OPTIMIZERS:
        for combo in supported_combos():
            name = f"{optimizer.name}_{combo_name(combo)}"
            jobs = []
            for length, begin, misalign in ranges:
                label = f"n={length} begin={begin} misalign={misalign} steps={STEPS}"
                values = random_values(begin + length + TAIL, stable_seed(name + label))
                jobs.append(build_job(label, optimizer, TIER_AVX512, combo, STEPS, begin,
                                      begin + length, misalign, values))
            plans.append(TestPlan("Avx512MatchesScalar", name, jobs, TIER_SCALAR))
            jobs = [
                build_job(f"special x special, n={special_count}, 1 step", optimizer,
                          TIER_AVX512, combo, 1, 0, special_count, 1,
                          special_values(special_count + TAIL, stable_seed(name))),
                build_job(f"specials in states too, raw 16-bit specials, n={special_count} "
                          "from 3, 2 steps", optimizer, TIER_AVX512, combo, 2, 3, special_count,
                          0, special_states(special_count + TAIL, stable_seed(name) + 1),
                          raw16_stride=5),
            ]
            plans.append(TestPlan("Avx512SpecialValuesMatchScalar", name, jobs, TIER_SCALAR))
    # The emulator against this machine: the scalar and AVX2 tiers, run in the
    # emulator, must give the bits they give natively.
    for tier in (TIER_SCALAR, TIER_AVX2):
        for optimizer in OPTIMIZERS:
            jobs = []
            for combo in supported_combos():
                label = f"{combo_name(combo)} n=33 begin=3 misalign=1 steps=2"
                jobs.append(build_job(label, optimizer, tier, combo, 2, 3, 36, 1,
                                      random_values(36 + TAIL, stable_seed(label))))
                label = f"{combo_name(combo)} special x special"
                jobs.append(build_job(label, optimizer, tier, combo, 1, 0, special_count, 0,
                                      special_values(special_count + TAIL, stable_seed(label))))
            plans.append(TestPlan("EmulatorMatchesThisCpu",
                                  f"{TIER_NAMES[tier]}_{optimizer.name}", jobs, tier))
    return plans


# ------------------------------------------------------------ comparison


def status_of(image: bytes) -> tuple[int, int, str]:
    status, steps_done = struct.unpack_from("<iI", image, OFF_STATUS)
    name = image[OFF_TABLE_NAME:OFF_TABLE_NAME + 16].split(b"\0")[0].decode(errors="replace")
    return status, steps_done, name


def where(job: Job, offset: int) -> str:
    for tensor in job.tensors:
        size = DTYPE_SIZES[tensor.dtype]
        if tensor.offset <= offset < tensor.offset + tensor.count * size:
            return f"{tensor.name}[{(offset - tensor.offset) // size}]"
    return f"guard byte at image offset {offset}"


def compare(job: Job, emulated: bytes, reference: bytes) -> list[str]:
    """Problems found, empty when the emulated image matches the reference:
    inside [begin, end) every element the same bits or NaN in both; every
    other byte (elements outside the range, the guards between tensors) as
    the job left it."""
    problems: list[str] = []
    for which, image, tier in (("emulated", emulated, job.tier), ("native", reference, None)):
        status, steps_done, table = status_of(image)
        if status != 0 or steps_done != job.steps:
            problems.append(f"{which} run: status {status} ({STATUS_NAMES.get(status, '?')}), "
                            f"{steps_done} of {job.steps} steps")
        if tier is not None and table != TIER_NAMES[tier]:
            problems.append(f"{which} run used kernel table '{table}', not {TIER_NAMES[tier]}")
    if problems or len(emulated) != len(job.image) or len(reference) != len(job.image):
        return problems or ["image size changed"]
    ranges = sorted((t.offset + job.begin * DTYPE_SIZES[t.dtype],
                     t.offset + job.end * DTYPE_SIZES[t.dtype], t) for t in job.tensors)
    cursor = HEADER_SIZE
    for low, high, tensor in ranges + [(len(job.image), len(job.image), None)]:
        if emulated[cursor:low] != job.image[cursor:low]:
            first = next(o for o in range(cursor, low) if emulated[o] != job.image[o])
            problems.append(f"{where(job, first)} is outside the range [{job.begin}, {job.end}) "
                            f"but was written (first changed byte at image offset {first}: "
                            f"0x{job.image[first]:02x} -> 0x{emulated[first]:02x})")
        cursor = high
    inputs = {t.name: (t, unpack(t.dtype, job.image[t.offset:t.offset + t.count *
                                                       DTYPE_SIZES[t.dtype]]))
              for t in job.tensors}
    for low, high, tensor in ranges:
        if emulated[low:high] == reference[low:high]:
            continue
        got = unpack(tensor.dtype, emulated[low:high])
        want = unpack(tensor.dtype, reference[low:high])
        mismatches = 0
        for i, (x, y) in enumerate(zip(got, want), start=job.begin):
            if x == y or (is_nan(tensor.dtype, x) and is_nan(tensor.dtype, y)):
                continue
            mismatches += 1
            if mismatches <= 6:
                context = ", ".join(
                    f"{name}={describe(t.dtype, values[i])}"
                    for name, (t, values) in inputs.items()
                    if name in ("param", "grad (step 1)", "exp_avg", "exp_avg_sq"))
                problems.append(f"{tensor.name}[{i}] ({DTYPE_NAMES[tensor.dtype]}): "
                                f"{TIER_NAMES[job.tier]} {describe(tensor.dtype, x)} vs "
                                f"reference {describe(tensor.dtype, y)}; inputs were {context}")
        if mismatches > 6:
            problems.append(f"{tensor.name}: {mismatches} elements differ in all")
    return problems


# ------------------------------------------------------------ the emulator


class Emulator:
    """One emulated CPU in 64-bit long mode, no OS. Guest memory is identity
    mapped with 2 MiB pages from MEM_BASE: the guest program at its link
    address (0x200000), the stack below STACK_TOP, jobs at JOB_ADDRESS."""

    MEM_BASE = 0x200000
    MEM_SIZE = 14 << 20
    STACK_TOP = 0x600000
    JOB_ADDRESS = 0x600000
    PAGE_TABLES = 0x1000  # PML4, PDPT, PD: three 4 KiB pages
    BRANCH_LIMIT = 5_000_000  # backward jumps (loop iterations) one job may run

    def __init__(self, bochscpu, elf_path: str) -> None:
        self.bochscpu = bochscpu
        memory = bochscpu.memory
        self.mem = mmap.mmap(-1, self.MEM_SIZE)
        self.tables = mmap.mmap(-1, 3 * 4096)
        mem_host = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        tables_host = ctypes.addressof(ctypes.c_char.from_buffer(self.tables))
        for offset in range(0, self.MEM_SIZE, 4096):
            memory.page_insert(self.MEM_BASE + offset, mem_host + offset)
        for i in range(3):
            memory.page_insert(self.PAGE_TABLES + 4096 * i, tables_host + 4096 * i)
        present_writable = 0x3
        struct.pack_into("<Q", self.tables, 0, (self.PAGE_TABLES + 0x1000) | present_writable)
        struct.pack_into("<Q", self.tables, 0x1000, (self.PAGE_TABLES + 0x2000) | present_writable)
        for page in range(self.MEM_BASE >> 21, (self.MEM_BASE + self.MEM_SIZE) >> 21):
            struct.pack_into("<Q", self.tables, 0x2000 + 8 * page,
                             (page << 21) | present_writable | 0x80)  # 0x80: 2 MiB page
        self.entry, self.segments = self._load(elf_path)
        self.session = bochscpu.Session()
        self.session.missing_page_handler = self._missing_page
        self.events: list[str] = []
        self.branches = 0
        self.hook = bochscpu.Hook()
        self.hook.hlt = self._on_hlt
        self.hook.exception = self._on_exception
        self.hook.cnear_branch_taken = self._on_branch
        self.hook.ucnear_branch = self._on_jump
        self.state = self._initial_state()

    def _load(self, path: str):
        with open(path, "rb") as file:
            elf = file.read()
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or struct.unpack_from("<H", elf, 18)[0] != 62:
            raise RuntimeError(f"{path} is not an x86-64 ELF64 file")
        if struct.unpack_from("<H", elf, 16)[0] != 2:
            raise RuntimeError(f"{path} is not a static executable (ET_EXEC)")
        entry, phoff = struct.unpack_from("<QQ", elf, 24)
        phentsize, phnum = struct.unpack_from("<HH", elf, 54)
        segments = []
        for k in range(phnum):
            kind, flags, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from(
                "<IIQQQQQQ", elf, phoff + k * phentsize)
            if kind in (2, 3, 7):  # PT_DYNAMIC, PT_INTERP, PT_TLS: the guest has no loader
                raise RuntimeError(f"{path} has a segment of type {kind}; it must be static")
            if kind != 1:
                continue
            if vaddr < self.MEM_BASE or vaddr + memsz > self.STACK_TOP - (1 << 20):
                raise RuntimeError(f"{path}: segment at {vaddr:#x}+{memsz:#x} is outside "
                                   f"the guest program's area")
            segments.append((vaddr, elf[offset:offset + filesz] + bytes(memsz - filesz),
                             bool(flags & 2)))
        for vaddr, data, _ in segments:
            start = vaddr - self.MEM_BASE
            self.mem[start:start + len(data)] = data
        return entry, segments

    def _initial_state(self):
        bochscpu = self.bochscpu
        state = bochscpu.State()
        state.cr0 = (1 << 31) | (1 << 16) | (1 << 5) | (1 << 4) | (1 << 1) | 1  # PG WP NE ET MP PE
        state.cr4 = (1 << 5) | (1 << 9) | (1 << 10) | (1 << 18)  # PAE OSFXSR OSXMMEXCPT OSXSAVE
        state.efer = (1 << 8) | (1 << 10) | (1 << 11)  # LME LMA NXE
        state.cr3 = self.PAGE_TABLES
        state.xcr0 = 0xE7  # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM: what an AVX-512 OS sets
        state.mxcsr = 0x1F80  # the default: round to nearest, exceptions masked, no FTZ/DAZ
        state.mxcsr_mask = 0xFFFF
        state.fpcw = 0x37F
        state.rflags = 0x2
        code = bochscpu.Segment()
        code.present, code.selector, code.base, code.limit = True, 0x08, 0, 0xFFFFFFFF
        code.attr = 0xAF9B  # 64-bit ring-0 code: G, L, P, S, execute/read
        data = bochscpu.Segment()
        data.present, data.selector, data.base, data.limit = True, 0x10, 0, 0xFFFFFFFF
        data.attr = 0xCF93  # ring-0 data: G, D/B, P, S, read/write
        state.cs = code
        state.ds = state.es = state.ss = state.fs = state.gs = data
        state.rip = self.entry
        state.rsp = self.STACK_TOP
        state.rdi = self.JOB_ADDRESS
        return state

    def _missing_page(self, gpa: int) -> None:
        self.events.append(f"access to unbacked guest-physical page {gpa:#x}")
        raise RuntimeError(self.events[-1])

    def _on_hlt(self, session, cpu_id: int) -> None:
        self.events.append("hlt")
        session.stop()

    def _on_exception(self, session, cpu_id: int, vector: int, error: int) -> None:
        names = {0: "#DE", 6: "#UD (invalid opcode)", 7: "#NM", 13: "#GP", 14: "#PF",
                 17: "#AC", 19: "#XM (SIMD floating point)"}
        self.events.append(f"exception {names.get(vector, vector)} error code {error:#x} at "
                           f"rip {session.cpu.rip:#x}" +
                           (f" cr2 {session.cpu.cr2:#x}" if vector == 14 else ""))
        session.stop()

    def _on_branch(self, session, cpu_id: int, branch_ip: int, new_ip: int) -> None:
        if new_ip <= branch_ip:
            self.branches += 1
            if self.branches == self.BRANCH_LIMIT:
                self.events.append(f"ran {self.BRANCH_LIMIT} loop iterations: stopped")
                session.stop()

    def _on_jump(self, session, cpu_id: int, what: int, branch_ip: int, new_ip: int) -> None:
        self._on_branch(session, cpu_id, branch_ip, new_ip)

    def run(self, image: bytes) -> tuple[bytes, str | None]:
        """Runs one job; returns the job image as the guest left it, and what
        went wrong, if anything."""
        if len(image) > self.MEM_BASE + self.MEM_SIZE - self.JOB_ADDRESS:
            raise RuntimeError("job image too large for guest memory")
        for vaddr, data, writable in self.segments:
            if writable:  # fresh .data and .bss for every job
                start = vaddr - self.MEM_BASE
                self.mem[start:start + len(data)] = data
        start = self.JOB_ADDRESS - self.MEM_BASE
        self.mem[start:start + len(image)] = image
        self.events.clear()
        self.branches = 0
        self.session.cpu.state = self.state
        self.session.run([self.hook])
        result = bytes(self.mem[start:start + len(image)])
        if self.events != ["hlt"]:
            return result, "; ".join(self.events) or "emulation stopped without HLT"
        return result, None

    def code_intact(self) -> bool:
        for vaddr, data, writable in self.segments:
            start = vaddr - self.MEM_BASE
            if not writable and self.mem[start:start + len(data)] != data:
                return False
        return True


def import_bochscpu(shim: str | None):
    """The bochscpu module, or the reason it cannot be had."""
    if shim:
        ctypes.CDLL(shim, mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
    try:
        import bochscpu  # noqa: F401
        import bochscpu.cpu  # noqa: F401
        import bochscpu.memory  # noqa: F401
    except ImportError as error:
        return None, (f"cannot import bochscpu ({error}); install the emulator with "
                      f"'{sys.executable} -m pip install bochscpu-python==0.4.0'")
    return bochscpu, None


# ------------------------------------------------------------ main


def run_reference(reference: str, jobs: list[Job], tiers: list[int]) -> list[bytes]:
    with tempfile.TemporaryDirectory(prefix="zinf-emu-") as directory:
        request = os.path.join(directory, "jobs.bin")
        answer = os.path.join(directory, "results.bin")
        with open(request, "wb") as file:
            for job, tier in zip(jobs, tiers):
                image = bytearray(job.image)
                struct.pack_into("<I", image, 8, tier)
                file.write(struct.pack("<Q", len(image)))
                file.write(image)
        subprocess.run([reference, request, answer], check=True)
        results = []
        with open(answer, "rb") as file:
            data = file.read()
        offset = 0
        while offset < len(data):
            (size,) = struct.unpack_from("<Q", data, offset)
            results.append(data[offset + 8:offset + 8 + size])
            offset += 8 + size
    if len(results) != len(jobs):
        raise RuntimeError(f"reference program answered {len(results)} of {len(jobs)} jobs")
    return results


def check_probe(emulator: Emulator, report: Report) -> bool:
    """The emulated CPU must offer AVX-512 as cpu_features.cpp detects it."""
    started = time.time()
    case = Case("EmulatedCpu", "ReportsAvx512FBwVlDqAsTheDispatcherReadsIt")
    job = probe_job()
    image, error = emulator.run(job.image)
    if error is None and status_of(image)[0] != 0:
        error = f"probe status {status_of(image)[0]}"
    if error is not None:
        case.status, case.message = "failed", f"probe did not run: {error}"
    else:
        leaf1 = struct.unpack_from("<4I", image, OFF_CPUID1)
        leaf7 = struct.unpack_from("<4I", image, OFF_CPUID7_0)
        leaf7_1 = struct.unpack_from("<4I", image, OFF_CPUID7_1)
        (xcr0,) = struct.unpack_from("<Q", image, OFF_XCR0)
        ecx1, ebx7 = leaf1[2], leaf7[1]
        features = {
            "FMA": ecx1 >> 12 & 1, "OSXSAVE": ecx1 >> 27 & 1, "AVX": ecx1 >> 28 & 1,
            "F16C": ecx1 >> 29 & 1, "AVX2": ebx7 >> 5 & 1, "AVX512F": ebx7 >> 16 & 1,
            "AVX512DQ": ebx7 >> 17 & 1, "AVX512BW": ebx7 >> 30 & 1, "AVX512VL": ebx7 >> 31 & 1,
            "XCR0 has opmask/ZMM state": int(xcr0 & 0xE6 == 0xE6),
        }
        bf16 = leaf7[0] >= 1 and leaf7_1[0] >> 5 & 1
        fp16 = leaf7[3] >> 23 & 1
        summary = (", ".join(f"{name} {'yes' if on else 'NO'}" for name, on in features.items())
                   + f"; AVX512-BF16 {'yes' if bf16 else 'no'}, AVX512-FP16 "
                   f"{'yes' if fp16 else 'no'} (zinf's kernels use neither)")
        case.details.append(f"CPUID.1 {['%08x' % r for r in leaf1]}, CPUID.7.0 "
                            f"{['%08x' % r for r in leaf7]}, XCR0 {xcr0:#x}")
        case.details.append(summary)
        print(f"emulated CPU: {summary}", flush=True)
        if not all(features.values()):
            case.status = "failed"
            case.message = "the emulated CPU lacks what the AVX-512 tier needs: " + summary
    case.seconds = time.time() - started
    report.add(case)
    return case.status == "passed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guest", required=True, help="the guest program (ELF)")
    parser.add_argument("--reference", required=True, help="the native reference program")
    parser.add_argument("--shim", help="library preloaded before bochscpu (glibc_shim.cpp)")
    parser.add_argument("--quick", action="store_true", help="3 ranges per case, not 16")
    args = parser.parse_args()

    report = Report()
    xml_path = report_path()
    bochscpu, reason = import_bochscpu(args.shim)
    if bochscpu is None:
        print(f"SKIPPED: {reason}", flush=True)
        report.add(Case("EmulatedCpu", "EmulatorAvailable", "skipped", reason))
        if xml_path:
            report.write_xml(xml_path)
        print("0 passed, 0 failed, 1 skipped")
        return 77

    started = time.time()
    plans = plan(args.quick)
    jobs = [job for p in plans for job in p.jobs]
    tiers = [p.reference_tier for p in plans for _ in p.jobs]
    print(f"{len(plans)} cases, {len(jobs)} jobs built in {time.time() - started:.1f} s",
          flush=True)
    started = time.time()
    expected = run_reference(args.reference, jobs, tiers)
    print(f"native reference ran in {time.time() - started:.1f} s", flush=True)

    emulator = Emulator(bochscpu, args.guest)
    emulated_seconds = 0.0
    if check_probe(emulator, report):
        index = 0
        for test in plans:
            case = Case(test.suite, test.name)
            started = time.time()
            failed_jobs = 0
            first_failure = ""
            for job in test.jobs:
                want = expected[index]
                index += 1
                if status_of(want)[0] == 4 and job.tier == TIER_AVX2:
                    case.status = "skipped"
                    case.message = "this machine has no AVX2 to compare the emulator with"
                    break
                got, error = emulator.run(job.image)
                if error is None and status_of(got)[0] == 4 and job.tier != TIER_AVX512:
                    case.status = "skipped"
                    case.message = (f"the guest was built without the {TIER_NAMES[job.tier]} "
                                    "tier (a sanitizer build instruments it; the release "
                                    "build runs this check)")
                    break
                problems = [f"emulation failed: {error}"] if error else compare(job, got, want)
                if problems:
                    failed_jobs += 1
                    if case.status != "failed":
                        case.status = "failed"
                        first_failure = job.label
                    case.details += [f"{job.label}: {problem}" for problem in problems]
            if case.status == "failed":
                case.message = (f"{TIER_NAMES[test.jobs[0].tier]} in the emulator differs from "
                                f"{TIER_NAMES[test.reference_tier]} natively in {failed_jobs} of "
                                f"{len(test.jobs)} jobs, first: {first_failure}")
            case.seconds = time.time() - started
            emulated_seconds += case.seconds
            report.add(case)
        integrity = Case("EmulatedCpu", "GuestCodeUnchangedAfterAllJobs")
        if not emulator.code_intact():
            integrity.status, integrity.message = "failed", "a job wrote into the guest's code"
        report.add(integrity)
    passed, failed, skipped = report.counts()
    print(f"emulated jobs took {emulated_seconds:.1f} s", flush=True)
    if xml_path:
        report.write_xml(xml_path)
        print(f"report: {xml_path}", flush=True)
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # a crash of the harness itself is a failure with its trace
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: bochscpu-python 0.4.0 can crash while its
    # nanobind objects and the emulator are destroyed at exit.
    os._exit(code)
