"""The comparison runner behind `python -m fastbb`.

Each benchmarks/cases_<family>.py offers `cases(device)`: a list of
{"name": str, "providers": {provider: zero-argument callable}, "baseline": provider, and optionally
 "representative": True (the case is in the default, quick run), "note": why a provider is missing,
 "compile_estimate_s": seconds a cold torch.compile of the case's "torch.compile" provider takes}.
The runner finds the cases_*.py files itself; it imports and builds only the families asked for. It times
every provider on the same prebuilt inputs in this process and reports median times and the speedup of each
provider over the baseline. On the CPU a case's providers are timed in interleaved rounds (one call of each
per round), so that a machine whose speed drifts over seconds (a shared VM) slows them alike instead of
favouring whichever ran in a quiet moment. On CUDA each call is timed with CUDA events after warm-up.

With a time budget (the GPU check), the runner first times every case without its torch.compile
provider, then adds the torch.compile providers whose cold compile fits what is left of the budget, and
lists those it dropped; it starts no case once the budget is spent. Each finished row is written to the
JSON file at once, so a run that is killed keeps what it finished.
"""
import contextlib
import datetime
import importlib
import json
import logging
import math
import os
import pathlib
import platform
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILE_PROVIDER = "torch.compile"
# A cold torch.compile when a case does not say (seconds): small graphs compile in a few seconds.
DEFAULT_COMPILE_ESTIMATE_S = {"cpu": 20.0, "cuda": 20.0}
LEGEND = """\
legend: median time per call; (Nx) = speedup over the row's baseline, its first provider.
  torchvision / eager   the code fastbb replaces (torchvision's op or module, or plain PyTorch)
  torch.compile         that same code under torch.compile
  fastbb                fastbb with the backend it picks on this device
  fastbb[B]             fastbb forced onto one backend B: cpp (its C++ kernels), cuda (its CUDA kernels),
                        triton (its Triton kernels); `python -m fastbb info` lists what each is here
  copy lateral          a plain copy of the lateral feature map: the memory floor of the FPN merge"""


def family_names():
    """Names of the benchmark families: the <family> of every benchmarks/cases_<family>.py, sorted."""
    here = pathlib.Path(__file__).parent
    return sorted(path.stem[len("cases_"):] for path in here.glob("cases_*.py"))


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn, device, min_time=1.0, max_repeats=50, warmup=2):
    """Median seconds of one call of fn (after warm-up), and the number of timed calls.

    Repeats until `min_time` seconds have been spent or `max_repeats` calls were made (at least 3).
    On CUDA each call is timed with a pair of CUDA events (launch overhead included, as the user sees it).
    """
    for _ in range(warmup):
        fn()
    times = []
    _synchronize(device)
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_repeats and time.perf_counter() - start < min_time):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def time_interleaved(providers, min_time=1.0, max_repeats=50, warmup=2):
    """{provider: (median seconds of one call, timed calls) or the exception it raised} on the CPU.

    After warm-up, rounds call every provider once each, until the providers have had `min_time` seconds
    each on average or `max_repeats` rounds ran (at least 3).
    """
    results, live = {}, {}
    for name, fn in providers.items():
        try:
            for _ in range(warmup):
                fn()
            live[name] = fn
        except Exception as exc:  # a provider that fails is reported, not hidden
            results[name] = exc
    times = {name: [] for name in live}
    start = time.perf_counter()
    rounds = 0
    while live and (rounds < 3 or (rounds < max_repeats and time.perf_counter() - start < min_time * len(live))):
        for name, fn in live.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    for name in live:
        results[name] = (statistics.median(times[name]), len(times[name]))
    return results


def peak_memory(fn, device):
    """Peak bytes allocated by one call on CUDA (the caching allocator's counter); None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def parametrize_cases(cases_module):
    """pytest parametrization over every (case, provider) of a cases_<op>.py module on DEVICE."""
    import pytest

    params = [(case, provider) for case in cases_module.cases(DEVICE) for provider in case["providers"]]
    return pytest.mark.parametrize("case, provider", params, ids=[f"{c['name']}-{p}" for c, p in params])


def backend_providers(op, device, fn):
    """{"fastbb[B]": fn run with backend B forced} for every backend B of op's table that can run on
    `device` here, except the reference and the Triton interpreter (no speed paths)."""
    import fastbb
    from fastbb import _backend

    def forced(backend):
        def run():
            with fastbb.use_backend(backend):
                return fn()
        return run

    return {f"fastbb[{backend}]": forced(backend) for backend in _backend.TABLES[op].usable_backends(device)
            if backend != "reference" and not (backend == "triton" and device == "cpu")}


# A busy single-threaded process, as a DataLoader worker decoding images is beside a training step. A plain
# interpreter (not multiprocessing, whose spawned children re-import the caller's main module).
_SPIN = "import sys\nwhile True:\n    sum(i * i for i in range(10_000))\n"


@contextlib.contextmanager
def busy_processes(count):
    """Run `count` busy processes beside the block (0: none), so timings show fastbb under contention."""
    import subprocess
    import sys

    workers = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(count)]
    try:
        yield
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def _family_modules(selected=None):
    names = family_names()
    unknown = sorted(set(selected or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; the families are {names}")
    return [importlib.import_module(f"fastbb.benchmarks.cases_{name}") for name in names
            if not selected or name in selected]


def collect_cases(device, only=None, families=None, exclude=(), representative=False):
    """Cases of the selected families (all by default) whose name contains a word of `only`, except the
    cases named exactly in `exclude`; with `representative`, only the cases marked so."""
    cases = []
    for module in _family_modules(families):
        family = module.__name__.rsplit("cases_", 1)[-1]
        for case in module.cases(device):
            if only and not any(word in case["name"] for word in only) or case["name"] in exclude:
                continue
            if representative and not case.get("representative"):
                continue
            cases.append(dict(case, family=family))
    return cases


def _measure(providers, device, min_time):
    """{provider: measurement dict} for the providers of one case (errors reported, not raised)."""
    measured = {}
    if device == "cpu":
        timings = time_interleaved(providers, min_time=min_time)
    for provider, fn in providers.items():
        try:
            if device == "cpu":
                if isinstance(timings[provider], Exception):
                    raise timings[provider]
                seconds, repeats = timings[provider]
            else:
                seconds, repeats = time_median(fn, device, min_time=min_time)
            measured[provider] = {"median_s": seconds, "repeats": repeats, "peak_bytes": peak_memory(fn, device)}
        except Exception as exc:  # a provider that fails is reported, not hidden
            measured[provider] = {"error": f"{type(exc).__name__}: {exc}"}
    return measured


def _header(device):
    import fastbb

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "device_type": device,
        "cpu_threads": torch.get_num_threads(),
        "timing": "interleaved rounds" if device == "cpu" else "CUDA events per call, median after warm-up",
        "triton_autotune": os.environ.get("FASTBB_TRITON_AUTOTUNE", "1") != "0",
        "versions": _versions(),
        "backends": fastbb.backends(),
        "results": [],
        "dropped": [],
    }


def _versions():
    import fastbb

    versions = {"fastbb": fastbb.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version()}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import torchvision
        versions["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return versions


def run(device=None, only=None, min_time=1.0, log=print, families=None, budget_s=None, json_path=None,
        exclude=(), representative=False, busy=0):
    """Time the cases of `families` (all by default) on `device` (default: cuda if present, else cpu),
    except those named in `exclude`; with `representative`, only the cases marked as such.

    budget_s: seconds for the whole run (None: no limit). With a budget, torch.compile providers are timed
    after every other provider of the run, each only when its cold compile (the case's
    "compile_estimate_s") fits the time left; the others are listed in report["dropped"]. json_path: the
    report is rewritten there after every row. busy: single-threaded busy processes run beside the timing
    (a CPU shared with DataLoader workers). Returns the report dict.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with busy_processes(busy):
        return _run(device, only, min_time, log, families, budget_s, json_path, exclude, representative, busy)


def _run(device, only, min_time, log, families, budget_s, json_path, exclude, representative, busy):
    # torch.compile's first import logs where it found CUDA_HOME on a machine without a GPU; that line says
    # nothing about the measurements and would land among the progress lines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    start = time.perf_counter()
    report = _header(device)
    report["busy_processes"] = busy

    def left():
        return math.inf if budget_s is None else budget_s - (time.perf_counter() - start)

    def save():
        if json_path:
            write_json(report, json_path)

    deferred = []  # (row, case) whose torch.compile provider waits for the second pass
    cases = collect_cases(device, only, families, exclude, representative)
    for number, case in enumerate(cases, 1):
        row = {"name": case["name"], "family": case["family"], "baseline": case["baseline"], "providers": {}}
        if case.get("note"):
            row["note"] = case["note"]
        report["results"].append(row)
        if left() <= 0:
            row["skipped"] = "the time budget was spent before this case"
            save()
            continue
        providers = dict(case["providers"])
        if budget_s is not None and COMPILE_PROVIDER in providers:
            deferred.append((row, case))
            del providers[COMPILE_PROVIDER]
        t0 = time.perf_counter()
        row["providers"] = _measure(providers, device, min_time)
        save()
        log(f"[{number}/{len(cases)}] {row['name']} ({time.perf_counter() - t0:.1f} s)")
    for row, case in deferred:
        estimate = case.get("compile_estimate_s", DEFAULT_COMPILE_ESTIMATE_S[device])
        if estimate > left():
            report["dropped"].append({"case": row["name"], "provider": COMPILE_PROVIDER,
                                      "why": f"its cold compile (about {estimate:.0f} s) does not fit the "
                                             f"{max(left(), 0):.0f} s left of the budget"})
            save()
            continue
        fn = case["providers"][COMPILE_PROVIDER]
        t0 = time.perf_counter()
        try:
            fn()  # the cold compile, timed on its own
            _synchronize(device)
            compile_s = time.perf_counter() - t0
            # On the CPU the baseline and fastbb are timed again in the same interleaved rounds, so that the
            # three are compared at one moment of a machine whose speed drifts.
            again = [name for name in (case["baseline"], "fastbb") if device == "cpu" and name in case["providers"]]
            remeasured = _measure({name: case["providers"][name] for name in again + [COMPILE_PROVIDER]},
                                  device, min_time)
            measured = remeasured.pop(COMPILE_PROVIDER)
            measured["compile_s"] = compile_s
        except Exception as exc:
            measured, remeasured = {"error": f"{type(exc).__name__}: {exc}"}, {}
        providers = dict(row["providers"], **remeasured)
        providers[COMPILE_PROVIDER] = measured
        row["providers"] = _in_case_order(providers, case)
        save()
        log(f"[torch.compile] {row['name']} (compiled in {measured.get('compile_s', 0):.1f} s)")
    report["elapsed_s"] = time.perf_counter() - start
    save()
    return report


def _in_case_order(providers, case):
    return {name: providers[name] for name in case["providers"] if name in providers}


def _ms(seconds):
    return f"{seconds * 1e3:9.3f} ms"


def format_row(row):
    if "skipped" in row:
        return f"{row['name']:<44} skipped: {row['skipped']}"
    base = row["providers"].get(row["baseline"], {}).get("median_s")
    parts = []
    for provider, m in row["providers"].items():
        if "error" in m:
            parts.append(f"{provider}: error ({m['error'][:60]})")
            continue
        speedup = f" ({base / m['median_s']:5.2f}x)" if base and provider != row["baseline"] else ""
        parts.append(f"{provider} {_ms(m['median_s'])}{speedup}")
    return f"{row['name']:<44} " + " | ".join(parts)


def print_table(report, out=print):
    busy = f", {report['busy_processes']} busy processes beside it" if report.get("busy_processes") else ""
    out(f"fastbb benchmarks on {report['device']} ({report['device_type']}, {report['cpu_threads']} threads{busy}), "
        f"torch {report['versions']['torch']}, {report['date']}")
    out(LEGEND)
    out("")
    for row in report["results"]:
        out(format_row(row))
        if row.get("note"):
            out(f"{'':<44} note: {row['note']}")
    for dropped in report.get("dropped", ()):
        out(f"dropped: {dropped['provider']} of {dropped['case']}: {dropped['why']}")


def write_json(report, path):
    """Write the report to path atomically (a reader never sees half a file, even if this process dies)."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(partial, path)


def check_plot_support():
    """Raise SystemExit now, before a long run, if --plot cannot work here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc


def write_plot(report, path):
    """A bar chart of each provider's speedup over the baseline, per case, on a log scale with the 1x line;
    every row is shown, a provider that was not timed is marked "n/a" (needs matplotlib)."""
    check_plot_support()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("providers")] or report["results"]
    providers = sorted({p for r in rows for p in r.get("providers", {}) if p != r["baseline"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) * max(1, len(providers)) ** 0.5 + 2), 5))
    width = 0.8 / max(1, len(providers))
    ax.set_yscale("log")
    labelled = set()
    for i, provider in enumerate(providers):
        for x, r in enumerate(rows):
            m = r.get("providers", {}).get(provider)
            base = r.get("providers", {}).get(r["baseline"], {}).get("median_s")
            position = x + i * width
            if m is None:
                continue
            if base and m.get("median_s"):
                ax.bar(position, base / m["median_s"], width, color=f"C{i}",
                       label=None if provider in labelled else provider)
                labelled.add(provider)
            else:
                ax.text(position, 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the baseline (x, log scale)")
    ax.set_title(f"fastbb on {report['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
