"""The one prepared GPU run: build for the GPU, run the CUDA tests file by file, run the GPU benchmarks
family by family, and leave at most 8 files in OUTDIR, refreshed after every step, so that whatever step
runs out of time (or if the whole run is killed), every finished result is there.

    python3 benchmarks/gpu_check.py OUTDIR [--dry] [--rerun-failed PREVIOUS_JSON] [--total S]

OUTDIR receives summary.txt (pass/fail counts and the speedup table), gpu_check.json (everything: build,
machine, per-file test results, benchmark rows) and logs.tar.gz (build, pytest and benchmark logs, junit
XML per test file).

- Steps run in order of value, each with its own time limit, inside one overall limit (--total, default
  360 s: the whole check must fit 6 minutes of a 15-minute GPU lease). Test files: post-processing, focal
  loss, FPN, conv/BN, ResNet; each runs its `cuda` tests with --maxfail (never -x), Triton autotuning off
  (FASTBB_TRITON_AUTOTUNE=0: one pinned config per kernel, one compile per specialisation) and, where
  pytest-xdist is installed, several workers for the files that compile many Triton specialisations.
- Benchmarks run through `python -m fastbb --budget`: only the selected families' cases are built, rows are
  written as they finish, and torch.compile providers run only where their cold compile fits.
- --rerun-failed PREVIOUS_JSON reruns only the test files and benchmark families that did not finish
  cleanly in that earlier gpu_check.json (default overall limit 180 s) and merges the results into it.
- --dry (or GPU_CHECK_DRY=1) runs the same steps on the CPU with small limits and without the build (the
  installed fastbb is used), so CI exercises this script on every run.
Exit status: 1 if the build failed, a test failed or errored, or a benchmark process crashed; timeouts are
reported in the summary, not failures.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# (group, test file, seconds on the GPU, pytest-xdist workers when available): in order of value.
TEST_PLAN = [
    ("post-processing", "tests/test_retinanet_postprocess.py", 40, 0),
    ("post-processing", "tests/test_nms.py", 40, 0),
    ("post-processing", "tests/test_box_decode.py", 25, 0),
    ("focal loss", "tests/test_focal_loss.py", 30, 0),
    ("FPN", "tests/test_upsample_nearest_add.py", 40, 4),
    ("FPN", "tests/test_fpn_merge.py", 45, 4),
    ("FPN", "tests/test_fpn.py", 25, 0),
    ("FPN", "tests/test_autocast_fpn_detection.py", 30, 0),
    ("conv/BN", "tests/test_conv_bn_relu.py", 50, 4),
    ("conv/BN", "tests/test_conv_eval_dispatch.py", 60, 6),
    ("ResNet", "tests/test_resnet.py", 40, 0),
    ("ResNet", "tests/test_autocast_resnet.py", 45, 0),
    ("RetinaNet", "tests/test_retinanet.py", 30, 0),
    ("RetinaNet", "tests/test_retinanet_loss.py", 20, 0),
]
# All test files together get at most this share of the overall limit, so the benchmarks always run.
TESTS_SHARE = 0.45
# (label, benchmark families, seconds on the GPU): in order of value.
BENCH_PLAN = [
    ("detection", ["nms", "box_decode", "retinanet_postprocess"], 45),
    ("focal loss", ["focal_loss"], 25),
    ("FPN", ["fpn"], 45),
    ("conv/BN and ResNet", ["conv_bn_relu"], 60),
    ("RetinaNet", ["retinanet"], 60),
]
BUILD_LIMIT_S = 150
DRY_TEST_LIMIT_S = 40
DRY_BENCH_LIMIT_S = 25
RESERVE_S = 8  # kept back at the end for the last packaging of OUTDIR
OUTPUT_FILES = ("summary.txt", "gpu_check.json", "logs.tar.gz")


class Check:
    def __init__(self, outdir, dry, total_s, previous):
        self.outdir = outdir
        self.dry = dry
        self.start = time.monotonic()
        self.deadline = self.start + total_s
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.state = previous or {"tests": {}, "benchmarks": {}}
        self.state.update(schema=1, date=_now(), mode=_mode(dry, previous), total_limit_s=total_s,
                          machine=_machine(dry))
        self.state.setdefault("runs", []).append({"mode": self.state["mode"], "date": self.state["date"]})
        os.makedirs(outdir, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", FASTBB_TRITON_AUTOTUNE="0",
                        TRITON_CACHE_DIR=os.path.join(self.work, "triton-cache"))

    # -- time ---------------------------------------------------------------------------------------
    def left(self):
        return self.deadline - time.monotonic() - RESERVE_S

    def limit(self, wanted):
        """The time a step may take: its own limit, cut to what is left overall."""
        return max(0.0, min(wanted, self.left()))

    def elapsed(self):
        return time.monotonic() - self.start

    def log(self, message):
        print(f"=== {message} ({self.elapsed():.0f} s)", flush=True)

    # -- running ------------------------------------------------------------------------------------
    def run(self, argv, limit, log_name, env=None):
        """Run argv with a time limit, output to work/log_name. Returns (exit code or 'timeout', seconds)."""
        path = os.path.join(self.work, log_name)
        t0 = time.monotonic()
        with open(path, "a") as log:
            log.write(f"$ {' '.join(argv)}  (limit {limit:.0f} s)\n")
            log.flush()
            # A new session, so that a timeout kills the whole tree (pytest-xdist workers, compilers).
            proc = subprocess.Popen(argv, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                code = "timeout"
                log.write(f"\n[gpu_check] killed after {limit:.0f} s\n")
        return code, time.monotonic() - t0

    # -- steps --------------------------------------------------------------------------------------
    def build(self):
        self.log("build")
        if self.dry:
            self.state["build"] = {"status": "skipped (dry run: the installed fastbb is used)"}
        else:
            env = dict(self.env, FASTBB_FORCE_CUDA="1", FASTBB_REQUIRE_EXTENSION="1",
                       FASTBB_CUDA_ARCHS=os.environ.get("FASTBB_CUDA_ARCHS", "9.0"),
                       MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
            code, seconds = self.run([PYTHON, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
                                      "-e", "."], self.limit(BUILD_LIMIT_S), "build.log", env)
            line = _last_match(os.path.join(self.work, "build.log"), r"^fastbb: built .*|^fastbb: .*skipped.*")
            self.state["build"] = {"status": "ok" if code == 0 else f"failed ({code})", "seconds": round(seconds, 1),
                                   "report": line}
        code, _ = self.run([PYTHON, "-m", "fastbb", "info"], self.limit(60), "info.txt")
        with open(os.path.join(self.work, "info.txt")) as f:
            self.state["info"] = f.read().splitlines()[1:]
        self.package()
        return self.state["build"]["status"].startswith(("ok", "skipped"))

    def tests(self, only_failed):
        tests_deadline = time.monotonic() + TESTS_SHARE * (self.deadline - time.monotonic())
        xdist = _has_module("xdist")
        for group, path, gpu_limit, workers in TEST_PLAN:
            previous = self.state["tests"].get(path)
            if only_failed and previous and previous["status"] in ("passed", "no cuda tests"):
                continue
            wanted = DRY_TEST_LIMIT_S if self.dry else gpu_limit
            limit = min(self.limit(wanted), max(0.0, tests_deadline - time.monotonic()))
            name = os.path.basename(path)[:-3]
            if limit < 5:
                self.state["tests"][path] = {"group": group, "status": "not run (no time left)"}
                continue
            self.log(f"tests: {path} (limit {limit:.0f} s)")
            junit = os.path.join(self.work, f"junit-{name}.xml")
            argv = [PYTHON, "-m", "pytest", "-v", "-m", "cuda", path, "--maxfail=10", f"--junitxml={junit}",
                    "-p", "no:cacheprovider", "-o", "addopts=--strict-markers"]
            if xdist and workers and not self.dry:
                argv += ["-n", str(workers)]
            code, seconds = self.run(argv, limit, f"pytest-{name}.log")
            self.state["tests"][path] = dict(_test_result(code, junit, os.path.join(self.work, f"pytest-{name}.log")),
                                             group=group, seconds=round(seconds, 1), limit_s=round(limit))
            self.package()

    def benchmarks(self, only_failed):
        device = "cpu" if self.dry else "cuda"
        for label, families, gpu_limit in BENCH_PLAN:
            previous = self.state["benchmarks"].get(label)
            if only_failed and previous and previous["status"] == "complete":
                continue
            limit = self.limit(DRY_BENCH_LIMIT_S if self.dry else gpu_limit)
            if limit < 10:
                self.state["benchmarks"][label] = {"families": families, "status": "not run (no time left)"}
                continue
            self.log(f"benchmarks: {label} (limit {limit:.0f} s)")
            json_path = os.path.join(self.work, f"bench-{families[0]}.json")
            if os.path.exists(json_path):
                os.remove(json_path)
            # The runner's own budget stops new cases in time; the process limit is the backstop. A rerun
            # skips the cases an earlier run measured.
            measured = _measured_cases((previous or {}).get("report"))
            argv = [PYTHON, "-m", "fastbb", "--device", device, "--family", *families,
                    "--min-time", "0" if self.dry else "0.2", "--budget", f"{max(limit - 8, 1):.0f}",
                    "--json", json_path] + (["--exclude", *measured] if measured else [])
            code, seconds = self.run(argv, limit, f"bench-{families[0]}.log")
            report = _read_json(json_path)
            status = _bench_status(code, report)
            report = _merge_reports((previous or {}).get("report"), report)
            self.state["benchmarks"][label] = {"families": families, "status": status, "seconds": round(seconds, 1),
                                               "limit_s": round(limit), "report": report}
            self.package()

    # -- output -------------------------------------------------------------------------------------
    def package(self):
        """Rewrite the (at most 8) files of OUTDIR from what has finished so far."""
        self.state["elapsed_s"] = round(self.elapsed(), 1)
        _write_atomic(os.path.join(self.outdir, "gpu_check.json"), json.dumps(self.state, indent=1))
        _write_atomic(os.path.join(self.outdir, "summary.txt"), summary(self.state))
        partial = os.path.join(self.outdir, "logs.tar.gz.partial")
        with tarfile.open(partial, "w:gz") as tar:
            for name in sorted(os.listdir(self.work)):
                if name != "triton-cache":
                    tar.add(os.path.join(self.work, name), arcname=f"logs/{name}")
        os.replace(partial, os.path.join(self.outdir, "logs.tar.gz"))

    def failed(self):
        build_failed = not self.state.get("build", {}).get("status", "").startswith(("ok", "skipped"))
        tests_failed = any(t["status"] in ("failed", "error") for t in self.state["tests"].values())
        bench_crashed = any(b["status"].startswith("crashed") for b in self.state["benchmarks"].values())
        return build_failed or tests_failed or bench_crashed


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _mode(dry, previous):
    return ("dry " if dry else "") + ("rerun of failed steps" if previous else "full")


def _machine(dry):
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if not dry and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        machine["gpu"] = query.stdout.strip()
    return machine


def _has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _last_match(path, pattern):
    found = None
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                if re.match(pattern, line.strip()):
                    found = line.strip()
    return found


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_atomic(path, text):
    with open(f"{path}.partial", "w") as f:
        f.write(text)
    os.replace(f"{path}.partial", path)


_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _test_result(code, junit, log):
    """Status and counts of one pytest run, from its junit XML, or from its -v log when it was killed."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    if code != "timeout" and os.path.exists(junit):
        root = ElementTree.parse(junit).getroot()
        for case in root.iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            kinds = [child.tag for child in case]
            if "failure" in kinds:
                counts["failed"] += 1
                failures.append(test_id)
            elif "error" in kinds:
                counts["error"] += 1
                failures.append(test_id)
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    else:
        with open(log, errors="replace") as f:
            for line in f:
                found = _OUTCOME.search(line)
                if found and "::" in line:
                    kind = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error"}.get(
                        found.group(1), "skipped")
                    counts[kind] += 1
                    if kind in ("failed", "error"):
                        failures.append(line.strip()[:200])
    if code == "timeout":
        status = "timeout"
    elif code == 5:
        status = "no cuda tests"
    elif counts["failed"]:
        status = "failed"
    elif counts["error"] or code != 0:
        status = "error"
    else:
        status = "passed"
    return {"status": status, "exit": code, "counts": counts, "failures": failures[:20]}


def _bench_status(code, report):
    if report is None:
        return "timeout (no row finished)" if code == "timeout" else f"crashed (exit {code}, no JSON)"
    if code == "timeout":
        return "timeout (partial)"
    if code != 0:
        return f"crashed (exit {code})"
    if any("skipped" in row for row in report.get("results", ())):
        return "partial (budget spent)"
    return "complete"


def _measured_cases(report):
    """Names of the cases of a runner report that have timings."""
    return [row["name"] for row in (report or {}).get("results", ()) if row.get("providers") and "skipped" not in row]


def _merge_reports(earlier, later):
    """The later runner report, with the rows only the earlier one measured put back (in the earlier order)."""
    if not earlier:
        return later
    if not later:
        return earlier
    measured = set(_measured_cases(earlier))
    fresh = {row["name"]: row for row in later.get("results", ()) if row["name"] not in measured}
    merged = dict(later)
    merged["results"] = [row for row in earlier["results"] if row["name"] in measured] + list(fresh.values())
    merged["dropped"] = earlier.get("dropped", []) + later.get("dropped", [])
    return merged


def _speedup(base, other):
    return f"{base / other:.2f}x" if base and other else "-"


def _ms(seconds):
    return f"{seconds * 1e3:.3f}" if seconds else "-"


def summary(state):
    lines = [f"fastbb GPU check, {state['mode']}, {state['date']}, {state.get('elapsed_s', 0):.0f} s of "
             f"{state['total_limit_s']:.0f}",
             f"machine: {state['machine'].get('gpu', 'no GPU')}; {state['machine']['cpus']} CPUs; "
             f"python {state['machine']['python']}"]
    build = state.get("build", {})
    lines.append(f"build: {build.get('status', 'not run')} {build.get('report') or ''}".rstrip())
    lines.extend(f"  {line}" for line in state.get("info", [])[:4])
    lines.append("")
    lines.append("tests (cuda-marked, file by file):")
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for path, test in state["tests"].items():
        counts = test.get("counts", {})
        for key in totals:
            totals[key] += counts.get(key, 0)
        lines.append(f"  {test['status']:<22} {path:<40} passed {counts.get('passed', 0):>3}  failed "
                     f"{counts.get('failed', 0):>2}  error {counts.get('error', 0):>2}  skipped "
                     f"{counts.get('skipped', 0):>3}  {test.get('seconds', 0):>5} s")
        for failure in test.get("failures", [])[:5]:
            lines.append(f"      {failure}")
    lines.append(f"  total: passed {totals['passed']}, failed {totals['failed']}, error {totals['error']}, "
                 f"skipped {totals['skipped']}")
    lines.append("")
    lines.append("benchmarks (median ms; speedup of fastbb over the baseline and over torch.compile):")
    lines.append(f"  {'case':<52} {'baseline':>18} {'compile':>9} {'fastbb':>9} {'vs base':>8} {'vs comp':>8}")
    dropped = []
    for label, bench in state["benchmarks"].items():
        lines.append(f"  [{label}: {bench['status']}, {bench.get('seconds', 0)} s]")
        report = bench.get("report") or {}
        dropped += report.get("dropped", [])
        for row in report.get("results", []):
            if "skipped" in row:
                lines.append(f"  {row['name'][:52]:<52} skipped: {row['skipped']}")
                continue
            providers = row["providers"]
            base = providers.get(row["baseline"], {}).get("median_s")
            compiled = providers.get("torch.compile", {}).get("median_s")
            fused = providers.get("fastbb", {}).get("median_s")
            errors = [f"{name}: {m['error'][:80]}" for name, m in providers.items() if "error" in m]
            lines.append(f"  {row['name'][:52]:<52} {row['baseline'][:8]:>8} {_ms(base):>9} {_ms(compiled):>9} "
                         f"{_ms(fused):>9} {_speedup(base, fused):>8} {_speedup(compiled, fused):>8}")
            lines.extend(f"      error {error}" for error in errors)
    for item in dropped:
        lines.append(f"  dropped: {item['provider']} of {item['case']}: {item['why']}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY", "0") == "1",
                        help="run on the CPU with small limits and no build (also GPU_CHECK_DRY=1)")
    parser.add_argument("--rerun-failed", metavar="PREVIOUS_JSON",
                        help="rerun only what did not finish cleanly in this earlier gpu_check.json")
    parser.add_argument("--total", type=float, default=None, help="overall limit in seconds (360; rerun 180)")
    args = parser.parse_args(argv)
    previous = None
    if args.rerun_failed:
        previous = _read_json(args.rerun_failed)
        if previous is None or "tests" not in previous:
            parser.error(f"--rerun-failed: {args.rerun_failed} is not a gpu_check.json")
    total = args.total or (180.0 if previous else 360.0)
    if not args.dry:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU is available here (use --dry to exercise the check on the CPU)")
    check = Check(args.outdir, args.dry, total, copy.deepcopy(previous))
    if check.build():
        check.tests(only_failed=previous is not None)
        check.benchmarks(only_failed=previous is not None)
    check.package()
    print(summary(check.state), flush=True)
    shutil.rmtree(check.work, ignore_errors=True)
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
