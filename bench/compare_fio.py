#!/usr/bin/env python3
"""zinf's engines against fio on the same directory, size, block size and
queue depth, run alternately so the shared disk's drift hits both alike.

    python3 bench/compare_fio.py --dir /var/tmp --size 4G --repeats 3 \
        --setting 1M,32,1 --setting 16M,64,1

For every repeat and setting it runs, in turn: zinf-bench with the io_uring
engine (buffers in 2 MiB huge pages, as zinf's pinned pool allocates them),
fio (--ioengine=io_uring --direct=1) with its buffers in huge pages
(--iomem=shmhuge), fio as it comes (malloc'd 4 KiB pages), zinf-bench with
4 KiB pages (--no-huge-pages), and zinf-bench with the posix engine. Each
zinf run is compared with the fio run whose buffers are of the same kind:
on virtual disks buffer contiguity alone can double the bandwidth. It prints
medians, ratios and CPU seconds per GB, and writes every sample to --json.
Needs fio (apt-get install fio), a built build/tools/zinf-bench, and root
for the huge-page reservation (vm.nr_hugepages, restored at the end)."""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
RUNNERS = ("zinf_uring", "fio_huge", "fio", "zinf_uring_4k", "zinf_posix")


def parse_bytes(text):
    text = text.strip().upper().rstrip("IB").rstrip("B")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def run_zinf(binary, directory, size, block, depth, threads, engine, huge_pages=True):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [binary, "--no-progress", "--nvme", directory, "--size", str(size),
             "--block-size", str(block), "--queue-depth", str(depth), "--threads", str(threads),
             "--engine", engine, "--repeat", "1", "--json", out.name,
             *([] if huge_pages else ["--no-huge-pages"])],
            check=True, stdout=subprocess.DEVNULL)
        records = json.load(open(out.name))["records"]
    return {r["op"]: {"gb_per_s": r["gb_per_s"], "cpu_s_per_gb": r["cpu_seconds_per_gb"],
                      "engine": r["engine"]} for r in records}


def run_fio(path, size, block, depth, threads, op, huge_pages=False):
    jobs = ["--numjobs", str(threads), "--size", str(size // threads),
            "--offset_increment", str(size // threads)] if threads > 1 else ["--size", str(size)]
    result = subprocess.run(
        ["fio", "--name=zinf-compare", f"--filename={path}", f"--bs={block}",
         f"--iodepth={depth}", "--ioengine=io_uring", "--direct=1", f"--rw={op}",
         "--group_reporting", "--output-format=json", *jobs,
         *(["--iomem=shmhuge"] if huge_pages else [])],
        check=True, capture_output=True, text=True)
    job = json.loads(result.stdout)["jobs"][0]
    side = job[op]
    runtime_s = job["job_runtime"] / 1000.0
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * runtime_s
    moved_gb = side["io_bytes"] / 1e9
    return {"gb_per_s": side["bw_bytes"] / 1e9, "cpu_s_per_gb": cpu_s / moved_gb if moved_gb else 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.environ.get("ZINF_BENCH_DIR", "/var/tmp"))
    parser.add_argument("--size", default="4G")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setting", action="append",
                        help="BLOCK,DEPTH,THREADS (default 1M,32,1 and 16M,64,1)")
    parser.add_argument("--binary", default=str(ROOT / "build" / "tools" / "zinf-bench"))
    parser.add_argument("--json", default="compare_fio.json")
    args = parser.parse_args()
    if shutil.which("fio") is None:
        sys.exit("fio not found: apt-get install fio")
    size = parse_bytes(args.size)
    settings = [tuple(s.split(",")) for s in (args.setting or ["1M,32,1", "16M,64,1"])]

    samples = {}
    scratch = tempfile.mkdtemp(prefix="zinf-fio.", dir=args.dir)
    hugepages_file = pathlib.Path("/proc/sys/vm/nr_hugepages")
    old_hugepages = int(hugepages_file.read_text())
    largest = max(parse_bytes(b) * int(d) * int(t) for b, d, t in settings)
    hugepages_file.write_text(str(old_hugepages + largest // (2 << 20) + 16))
    try:
        fio_file = os.path.join(scratch, "fio.bin")
        # fio lays the file out on its first job; do it once, outside timing.
        run_fio(fio_file, size, parse_bytes("16M"), 32, 1, "write")
        for repeat in range(args.repeats):
            for block_text, depth_text, threads_text in settings:
                block, depth, threads = parse_bytes(block_text), int(depth_text), int(threads_text)
                key = f"{block_text} x {depth} x {threads}"
                entry = samples.setdefault(key, {name: [] for name in RUNNERS})
                entry["zinf_uring"].append(run_zinf(args.binary, args.dir, size, block, depth, threads, "uring"))
                entry["fio_huge"].append({op: run_fio(fio_file, size, block, depth, threads, op, True)
                                          for op in ("write", "read")})
                entry["fio"].append({op: run_fio(fio_file, size, block, depth, threads, op)
                                     for op in ("write", "read")})
                entry["zinf_uring_4k"].append(
                    run_zinf(args.binary, args.dir, size, block, depth, threads, "uring", huge_pages=False))
                entry["zinf_posix"].append(run_zinf(args.binary, args.dir, size, block, depth, threads, "posix"))
                print(f"repeat {repeat + 1}/{args.repeats} {key}: " + ", ".join(
                    f"{name} w {s[-1]['write']['gb_per_s']:.2f} r {s[-1]['read']['gb_per_s']:.2f}"
                    for name, s in entry.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        hugepages_file.write_text(str(old_hugepages))

    print(f"\nmedians of {args.repeats}, {args.size} per pass, GB = 1e9 bytes, dir {args.dir}")
    print("huge = buffers in 2 MiB pages, 4k = buffers in 4 KiB pages; ratio = zinf / fio with the same buffers\n")
    print("| setting | op | fio huge | zinf io_uring huge | ratio | fio 4k | zinf io_uring 4k | ratio | zinf posix huge |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    rows_cpu = []
    for key, entry in samples.items():
        for op in ("write", "read"):
            med = {name: {m: statistics.median(s[op][m] for s in runs) for m in ("gb_per_s", "cpu_s_per_gb")}
                   for name, runs in entry.items()}
            ratio_huge = med["zinf_uring"]["gb_per_s"] / med["fio_huge"]["gb_per_s"]
            ratio_4k = med["zinf_uring_4k"]["gb_per_s"] / med["fio"]["gb_per_s"]
            summary[f"{key} {op}"] = {**med, "ratio_huge": ratio_huge, "ratio_4k": ratio_4k}
            print(f"| {key} | {op} | {med['fio_huge']['gb_per_s']:.2f} | {med['zinf_uring']['gb_per_s']:.2f} | "
                  f"{ratio_huge:.2f} | {med['fio']['gb_per_s']:.2f} | {med['zinf_uring_4k']['gb_per_s']:.2f} | "
                  f"{ratio_4k:.2f} | {med['zinf_posix']['gb_per_s']:.2f} |")
            rows_cpu.append((key, op, med))
    print("\nCPU seconds per GB (whole process, user + system)\n")
    print("| setting | op | " + " | ".join(RUNNERS) + " |")
    print("|---|---|" + "---|" * len(RUNNERS))
    for key, op, med in rows_cpu:
        print(f"| {key} | {op} | " + " | ".join(f"{med[name]['cpu_s_per_gb']:.4f}" for name in RUNNERS) + " |")
    json.dump({"size": size, "repeats": args.repeats, "dir": args.dir, "samples": samples,
               "medians": summary}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
