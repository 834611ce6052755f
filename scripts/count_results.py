#!/usr/bin/env python3
"""Sums GoogleTest XML reports under a results directory into one line,
"N passed, N failed, N skipped". A suite binary that died before writing its
report (a sanitizer abort, a crash) counts as one failed test. Exits 1 when
anything failed."""
import json
import pathlib
import sys
import xml.etree.ElementTree as ElementTree


def main(root: pathlib.Path) -> int:
    passed = failed = skipped = 0
    for variant in sorted(p for p in root.iterdir() if p.is_dir()):
        reported = set()
        for report in variant.glob("*.xml"):
            reported.add(report.stem)
            for case in ElementTree.parse(report).iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed += 1
                    print(f"FAILED [{variant.name}] {case.get('classname')}.{case.get('name')}")
                elif case.get("result") == "skipped" or case.find("skipped") is not None:
                    skipped += 1
                else:
                    passed += 1
        log = variant / "testlog.json"
        if log.exists():
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                binary = pathlib.Path(entry["command"][0]).name
                if entry["result"] not in ("OK", "SKIP") and binary not in reported:
                    failed += 1
                    print(f"FAILED [{variant.name}] {entry['name']}: {entry['result']} without a report")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "build-test-results")))
