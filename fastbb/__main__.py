"""`python -m fastbb`: the benchmark table on the default RetinaNet R50-FPN shapes.

    python -m fastbb [--full] [--device cpu|cuda] [--family NAME ...] [--only WORD ...] [--min-time S]
                     [--budget S] [--json PATH] [--plot PATH.png]
    python -m fastbb info
    python -m fastbb backends

By default a representative case of each family runs, within a budget of QUICK_BUDGET_S seconds (about
3 minutes on a 2-core CPU); --full (or --family / --only) runs every selected case.
"""
import argparse
import platform
import sys

import torch

# The default run: one representative case per family, torch.compile comparisons where they fit.
QUICK_BUDGET_S = 150.0


def info():
    import fastbb
    from fastbb import _backend

    print(f"fastbb  {fastbb.__version__}")
    print(f"python  {platform.python_version()}")
    print(f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton  {triton.__version__}")
    except ImportError:
        print("triton  not installed")
    print(f"build   {_backend.build_report()}")
    ext = _backend.extension()
    if ext is None:
        print(f"fastbb._C: unusable: {_backend._extension_error}")
    else:
        print(f"fastbb._C: built for torch {ext.torch_version}, CUDA kernels "
              f"{'compiled' if ext.with_cuda() else 'not compiled'}, OpenMP {'on' if ext.with_openmp() else 'off'}")
    if torch.cuda.is_available():
        print(f"device  {torch.cuda.get_device_name()} (CUDA)")
    else:
        print(f"device  CPU only ({torch.get_num_threads()} threads)")
    print("backends:")
    for name, state in fastbb.backends().items():
        usable = ", ".join(state["usable_on"]) or "nowhere"
        why = f"  ({state['why']})" if state["why"] else ""
        print(f"  {name:<10} built: {'yes' if state['built'] else 'no ':<4} usable on: {usable}{why}")
    print(f"registered types: {', '.join(fastbb.registered())}")


def backend_matrix():
    """Markdown: per op, the backends it runs on each device in order of preference, and its autocast rule;
    then what each backend is. Generated from the ops' tables (the README's copy is checked by a test)."""
    import fastbb  # noqa: F401  (declares every op's table)
    from fastbb import _backend

    lines = ["| op | CPU (in order of preference) | CUDA (in order of preference) | under autocast |",
             "|---|---|---|---|"]
    # Ops by name, each op's stages right after it.
    for table in sorted(_backend.TABLES.values(), key=lambda t: (t.stage_of or t.op, t.op)):
        if table.op.startswith("test_"):
            continue
        columns = []
        for device in ("cpu", "cuda"):
            names = [i.backend for i in table.implementations if device in i.devices]
            columns.append(", ".join(f"`{name}`" for name in dict.fromkeys(names)))
        lines.append(f"| `{table.op}` | {columns[0]} | {columns[1]} | {table.autocast} |")
    lines += ["", "| backend | what it is |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in _backend.BACKENDS.items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "info", "backends"],
                        help="bench (default): the benchmark table; info: versions, build, backends; "
                             "backends: the per-op backend matrix (Markdown)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--full", action="store_true", help="run every case, not one representative per family")
    parser.add_argument("--family", nargs="+", default=None, metavar="NAME",
                        help="run only these benchmark families (the NAME of benchmarks/cases_NAME.py)")
    parser.add_argument("--only", nargs="+", default=None, help="run only cases whose name contains a word")
    parser.add_argument("--exclude", nargs="+", default=(), metavar="CASE", help="skip the cases of these exact names")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per provider")
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="seconds for the whole run: torch.compile providers run last, only where their cold "
                             "compile fits, and no case starts once the budget is spent")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="run N busy processes beside the timing (a CPU shared with DataLoader workers)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (row by row, as they finish)")
    parser.add_argument("--plot", metavar="PATH.png", help="write a speedup bar chart (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "backends":
        print(backend_matrix())
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    from fastbb.benchmarks import runner

    if args.plot:
        runner.check_plot_support()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = not (args.full or args.family or args.only)
    budget = args.budget if args.budget is not None or not quick else QUICK_BUDGET_S
    print(f"fastbb benchmarks on {device}: "
          + ("one representative case per family (--full for all), " if quick else "")
          + (f"within {budget:.0f} s" if budget else "no time limit"), file=sys.stderr)

    def progress(line):
        print(f"  {line}", file=sys.stderr, flush=True)

    try:
        report = runner.run(device, only=args.only, min_time=args.min_time, families=args.family,
                            budget_s=budget, json_path=args.json, exclude=args.exclude, representative=quick,
                            log=progress, busy=args.busy)
    except ValueError as exc:  # an unknown family
        parser.error(str(exc))
    print()
    runner.print_table(report)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        runner.write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
