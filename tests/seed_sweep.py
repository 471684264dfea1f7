"""Run the randomized accuracy tests over many seeds and report each test's worst error ratio.

Not a test (pytest collects test_*.py and bench_*.py only), and not run in CI: a one-off measurement that
sets the factors passed to conftest.assert_error_within. Each test's CI run draws its inputs from the seed
conftest derives from its id; FASTBB_TEST_SEED=s adds s to that seed. This script runs, in one pytest
process, every selected test with s = 0 (the CI draw), and each test that checked an error against the
original's there (it called assert_error_within, which then records its ratio) again with s = 1..N-1.
Tests written later are found the same way: nothing here lists them.

    python tests/seed_sweep.py                        # every tests/test_*.py file that calls the helper
    python tests/seed_sweep.py --seeds 50 tests/test_resnet.py -k eval
    python tests/seed_sweep.py --test-seconds 120     # at most ~120 s of seeds per test (heavy ones get fewer)

Prints, per test function (or per test with --per-test): the seeds run, the worst ratio of fastbb's error to
the original's, the worst share of the bound used, and the factor; flags a test whose worst share of its
bound exceeds 1 / 1.1 (its factor should be at least 10% above the worst ratio seen) or that failed.
"""
import argparse
import collections
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import pytest
from _pytest.runner import runtestprotocol

TESTS = pathlib.Path(__file__).resolve().parent
MARGIN = 1.1  # each bound at least 10% above the worst value seen


class SeedRepeater:
    """pytest plugin: runs each test with FASTBB_TEST_SEED=first_seed (0: the CI draw), then, when that run
    recorded an error ratio, with the next seeds up to `seeds` in all while the test's time allows. Appends
    each run's outcome to the record."""

    def __init__(self, seeds, test_seconds, record, every_test=False, first_seed=0):
        self.seeds, self.test_seconds, self.record, self.every_test = seeds, test_seconds, record, every_test
        self.first_seed = first_seed

    def _run(self, item, nextitem, seed):
        """Run item once with `seed`; whether to repeat it: it ran (not skipped) and recorded an error ratio
        (or every test repeats)."""
        os.environ["FASTBB_TEST_SEED"] = str(seed)
        before = os.path.getsize(self.record)
        # As pytest-rerunfailures reruns a test: the real nextitem, so that each run tears down the test's
        # function fixtures (and the module's, when the next test is in another module).
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        recorded = os.path.getsize(self.record) > before
        failed = [r for r in reports if r.failed]
        outcome = "failed" if failed else "skipped" if any(r.skipped for r in reports) else "passed"
        with open(self.record, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "seed": seed, "outcome": outcome,
                                "error": failed[0].longreprtext[-3000:] if failed else None}) + "\n")
        return outcome != "skipped" and (recorded or self.every_test)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        start = time.monotonic()
        seeds = 1
        if self._run(item, nextitem, self.first_seed):
            while seeds < self.seeds and not (self.test_seconds and time.monotonic() - start > self.test_seconds):
                self._run(item, nextitem, self.first_seed + seeds)
                seeds += 1
        terminal = item.config.pluginmanager.get_plugin("terminalreporter")
        terminal.write_line(f"{item.nodeid}: {seeds} seed(s), {time.monotonic() - start:.1f} s")
        return True


def files_using_the_helper():
    return sorted(str(p) for p in TESTS.glob("test_*.py") if "assert_error_within(" in p.read_text())


def summarize(record, per_test):
    """{group: summary} from the JSON lines of `record`."""
    group_of = (lambda test: test) if per_test else (lambda test: re.sub(r"\[.*\]$", "", test))
    groups = collections.OrderedDict()

    def group(test):
        return groups.setdefault(group_of(test), dict(seeds=collections.defaultdict(set), worst_ratio=None,
                                                      worst_share=None, worst_at=None, factors=set(), failures=[]))

    for line in pathlib.Path(record).read_text().splitlines():
        entry = json.loads(line)
        if "outcome" in entry:
            g = group(entry["test"])
            if entry["outcome"] != "skipped":
                g["seeds"][entry["test"]].add(entry["seed"])
            if entry["outcome"] == "failed":
                g["failures"].append((entry["test"], entry["seed"], entry["error"]))
            continue
        g = group(entry["test"])
        g["factors"].add(entry["factor"])
        if entry["ratio"] is not None and (g["worst_ratio"] is None or entry["ratio"] > g["worst_ratio"]):
            g["worst_ratio"] = entry["ratio"]
        if entry["share_of_bound"] is not None and (g["worst_share"] is None
                                                   or entry["share_of_bound"] > g["worst_share"]):
            g["worst_share"] = entry["share_of_bound"]
            g["worst_at"] = f"{entry['test']} {entry['name']}".strip()
    return {name: g for name, g in groups.items() if g["factors"] or g["failures"]}


def report(summary):
    flagged = 0
    rows = [("test", "seeds", "worst ratio", "worst share", "factor", "")]
    for name, g in summary.items():
        seeds = [len(s) for s in g["seeds"].values()] or [0]
        too_close = g["worst_share"] is not None and g["worst_share"] > 1 / MARGIN
        flag = "FAILED" if g["failures"] else "CLOSE" if too_close else ""
        flagged += bool(flag)
        rows.append((name, f"{min(seeds)}" if min(seeds) == max(seeds) else f"{min(seeds)}-{max(seeds)}",
                     "-" if g["worst_ratio"] is None else f"{g['worst_ratio']:.3f}",
                     "-" if g["worst_share"] is None else f"{g['worst_share']:.3f}",
                     "/".join(f"{f:g}" for f in sorted(g["factors"])), flag))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for name, g in summary.items():
        if g["worst_at"] and g["worst_share"] is not None and g["worst_share"] > 1 / MARGIN:
            print(f"closest to its bound: {g['worst_at']} ({g['worst_share']:.3f} of it)")
        for test, seed, error in g["failures"][:3]:
            print(f"FAILED {test} with FASTBB_TEST_SEED={seed}:\n{error}\n")
    print(f"{len(summary)} tests, {flagged} flagged (share of bound > 1/{MARGIN} or failed)")
    return flagged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="test files or node ids (default: every test file using "
                        "assert_error_within)")
    parser.add_argument("--seeds", type=int, default=200, help="seeds per test (default 200)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds FIRST..FIRST+SEEDS-1 (to extend an earlier sweep's --record)")
    parser.add_argument("--test-seconds", type=float, default=0.0,
                        help="stop repeating a test after this many seconds (0: no limit)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("-m", dest="marker", help="pytest -m expression")
    parser.add_argument("--every-test", action="store_true",
                        help="repeat every selected test, also those that check no error ratio (failures are listed)")
    parser.add_argument("--record", help="JSON-lines file to append to (default: a temporary file)")
    parser.add_argument("--per-test", action="store_true", help="one row per parametrized test, not per function")
    parser.add_argument("--summarize", action="store_true", help="only print the summary of an existing --record")
    args = parser.parse_args(argv)
    record = args.record or tempfile.mkstemp(prefix="seed_sweep_", suffix=".jsonl")[1]
    if not args.summarize:
        pathlib.Path(record).touch()
        os.environ["FASTBB_RECORD_ERROR_RATIOS"] = record
        pytest_args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(TESTS.parent),
                       *(["-m", args.marker] if args.marker else []), *(["-k", args.keyword] if args.keyword else []),
                       *(args.paths or files_using_the_helper())]
        print(f"recording to {record}", flush=True)
        pytest.main(pytest_args, plugins=[SeedRepeater(args.seeds, args.test_seconds, record, args.every_test,
                                                              args.first_seed)])
    return 1 if report(summarize(record, args.per_test)) else 0


if __name__ == "__main__":
    sys.exit(main())
