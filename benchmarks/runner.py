"""The comparison runner behind `python -m fastbb`.

Each benchmarks/cases_<op>.py offers `cases(device)`: a list of
{"name": str, "providers": {provider: zero-argument callable}, "baseline": provider}. The runner times
every provider on the same prebuilt inputs in this process and prints the median times and the
speedup of each provider over the baseline. On the CPU a case's providers are timed in interleaved rounds
(one call of each per round), so that a machine whose speed drifts over seconds (a shared VM) slows them
alike instead of favouring whichever ran in a quiet moment.
"""
import datetime
import importlib
import json
import math
import platform
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE_MODULES = ("cases_nms", "cases_box_decode", "cases_retinanet_postprocess", "cases_focal_loss", "cases_fpn",
                "cases_conv_bn_relu")


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn, device, min_time=1.0, max_repeats=50, warmup=2):
    """Median seconds of one call of fn (after warm-up), and the number of timed calls.

    Repeats until `min_time` seconds have been spent or `max_repeats` calls were made (at least 3).
    On CUDA the calls are timed with events, so launch overhead is measured as the user sees it.
    """
    if device == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)), return_mode="median")
        return ms / 1000.0, None
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_repeats and time.perf_counter() - start < min_time):
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


def collect_cases(device, only=None):
    cases = []
    for module_name in CASE_MODULES:
        module = importlib.import_module(f"fastbb.benchmarks.{module_name}")
        for case in module.cases(device):
            if only and not any(word in case["name"] for word in only):
                continue
            cases.append(case)
    return cases


def run(device=None, only=None, min_time=1.0, log=print):
    """Time every case on `device` (default: cuda if present, else cpu); return the result dict."""
    import fastbb

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in collect_cases(device, only):
        row = {"name": case["name"], "baseline": case["baseline"], "providers": {}}
        if device == "cpu":
            timings = time_interleaved(case["providers"], min_time=min_time)
        for provider, fn in case["providers"].items():
            try:
                if device == "cpu":
                    if isinstance(timings[provider], Exception):
                        raise timings[provider]
                    seconds, repeats = timings[provider]
                else:
                    seconds, repeats = time_median(fn, device, min_time=min_time)
                row["providers"][provider] = {"median_s": seconds, "repeats": repeats,
                                              "peak_bytes": peak_memory(fn, device)}
            except Exception as exc:  # a provider that fails is reported, not hidden
                row["providers"][provider] = {"error": f"{type(exc).__name__}: {exc}"}
        results.append(row)
        log(format_row(row))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "device_type": device,
        "cpu_threads": torch.get_num_threads(),
        "timing": "interleaved rounds" if device == "cpu" else "triton.testing.do_bench per provider",
        "versions": {"fastbb": fastbb.__version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "backends": fastbb.backends(),
        "results": results,
    }


def _ms(seconds):
    return f"{seconds * 1e3:9.3f} ms"


def format_row(row):
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
    out(f"fastbb benchmarks on {report['device']} ({report['device_type']}, {report['cpu_threads']} threads), "
        f"torch {report['versions']['torch']}, {report['date']}")
    out("median time per call; (Nx) = speedup over the first provider of the row, the baseline")
    for row in report["results"]:
        out(format_row(row))


def write_json(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def write_plot(report, path):
    """A bar chart of each provider's speedup over the baseline, per case (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    rows = [r for r in report["results"] if r["providers"].get(r["baseline"], {}).get("median_s")]
    providers = sorted({p for r in rows for p in r["providers"] if p != r["baseline"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * max(1, len(providers))), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        speedups = []
        for r in rows:
            m = r["providers"].get(provider, {})
            base = r["providers"][r["baseline"]]["median_s"]
            speedups.append(base / m["median_s"] if m.get("median_s") else math.nan)
        ax.bar([x + i * width for x in range(len(rows))], speedups, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over baseline (x)")
    ax.set_title(f"fastbb on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
