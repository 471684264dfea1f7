"""Compare repeated benchmark runs (JSON files written by `python -m fastbb --json PATH`).

    python benchmarks/compare_runs.py times OLD_GLOB NEW_GLOB      # fastbb providers: median time, new/old
    python benchmarks/compare_runs.py speedups QUIET_GLOB BUSY_GLOB  # speedup over the baseline, busy/quiet

Each side is several runs (alternate the two sides' runs so machine drift hits them alike); a row's value
on a side is the median over its runs, and the spread (min-max) is printed beside it.
"""
import argparse
import glob
import json
import statistics


def load(pattern):
    """{(row name, provider): [median seconds, one per run]}, and the runs' row order."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"compare_runs: no file matches {pattern!r}")
    times, order = {}, []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for row in report["results"]:
            if (row["name"], row["baseline"]) not in order:
                order.append((row["name"], row["baseline"]))
            for provider, measured in row.get("providers", {}).items():
                if "median_s" in measured:
                    times.setdefault((row["name"], provider), []).append(measured["median_s"])
    return times, order, len(paths)


def compare_times(old_pattern, new_pattern):
    old, _, n_old = load(old_pattern)
    new, _, n_new = load(new_pattern)
    print(f"{n_old} old runs, {n_new} new runs; fastbb providers, median over runs; new/old > 1 is slower")
    ratios = []
    for name, provider in sorted(new):
        if not provider.startswith("fastbb") or (name, provider) not in old:
            continue
        o, n = old[name, provider], new[name, provider]
        ratio = statistics.median(n) / statistics.median(o)
        ratios.append((ratio, name, provider))
        print(f"{name[:52]:<52} {provider:<12} old {statistics.median(o) * 1e3:9.2f} ms "
              f"({min(o) * 1e3:.1f}-{max(o) * 1e3:.1f})  new {statistics.median(n) * 1e3:9.2f} ms "
              f"({min(n) * 1e3:.1f}-{max(n) * 1e3:.1f})  new/old {ratio:5.2f}")
    worst = max(ratios)
    print(f"slowest new/old: {worst[0]:.3f} ({worst[1]}, {worst[2]})")


def compare_speedups(quiet_pattern, busy_pattern):
    quiet, order, n_quiet = load(quiet_pattern)
    busy, _, n_busy = load(busy_pattern)
    print(f"{n_quiet} quiet runs, {n_busy} busy runs: fastbb's speedup over the row's baseline, median "
          f"(min-max over runs); busy/quiet is the ratio of the medians")
    for name, baseline in order:
        def speedups(times):
            return [b / f for b, f in zip(times.get((name, baseline), []), times.get((name, "fastbb"), []))]
        q, b = speedups(quiet), speedups(busy)
        if not q or not b:
            continue
        mq, mb = statistics.median(q), statistics.median(b)
        print(f"{name[:50]:<50} quiet {mq:6.2f}x ({min(q):.2f}-{max(q):.2f})  busy {mb:6.2f}x "
              f"({min(b):.2f}-{max(b):.2f})  busy/quiet {mb / mq:4.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["times", "speedups"])
    parser.add_argument("first", help="glob of the old (times) or quiet (speedups) runs' JSON files")
    parser.add_argument("second", help="glob of the new (times) or busy (speedups) runs' JSON files")
    args = parser.parse_args()
    (compare_times if args.mode == "times" else compare_speedups)(args.first, args.second)


if __name__ == "__main__":
    main()
