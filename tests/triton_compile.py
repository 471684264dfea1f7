"""Compile every Triton kernel of kernels/*.py for real GPUs (sm_90 and sm_80), without a GPU.

    python tests/triton_compile.py [--jobs N] [--arch 90,80] [--only TEXT]

The interpreter tests run the kernels' logic on the CPU but never compile them; this script does, for the
GPUs fastbb is tuned for. It drives each launcher of kernels/*.py with tensors on the `meta` device
(shapes and strides, no memory), records every launch instead of running it, lets Triton's own binder
derive what a real launch would compile (pointer and scalar types, integers specialised as == 1,
divisibility by 16 of pointers and integers, constexprs, num_warps / num_stages), and compiles that with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` in a process pool. The binder is
the one JITFunction.run calls (create_function_from_signature, JITFunction._pack_args), with the same
signatures in Triton 3.6 and 3.8; how the two encode attributes (3.8 lists constexpr positions with
empty attribute lists, 3.6 leaves them out) stays between the binder and ASTSource of the same version.

Coverage: every dtype a launcher takes, NCHW and channels_last, int32 and int64 offsets (OFFSET), the
constexpr branches (bias, residual, labels, weights, clipping, ...), every autotune config for bfloat16
and float32 and float64 (its own list), the pinned config (FASTBB_TRITON_AUTOTUNE=0) for the rest.

Fails (exit code 1) on a compile error, on a `*_kernel` jit function in kernels/ that no case launched
(so a new kernel cannot be forgotten), on shared memory over the target's per-block limit, and on more
registers than one block may hold. Prints the cases' specialisations, then one table: kernel, case,
config, arch, shared memory, registers and stack (cuobjdump --dump-resource-usage of the cubin), spill
stores / loads (ptxas's own -v report), compile seconds.

Not collected by pytest (not a test_*.py file); CI runs it under each supported Triton (.ci/run).
"""
import argparse
import contextlib
import functools
import importlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Before triton is imported: compile for real (GPU configs in the launchers, no interpreter), have ptxas's
# -v report printed (the spill counts come from it), and start from an empty cache so that every kernel is
# really compiled and the seconds are compile times.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
_CACHE = tempfile.TemporaryDirectory(prefix="fastbb-triton-compile-")
os.environ["TRITON_CACHE_DIR"] = _CACHE.name

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fastbb.kernels import (_common, bn_relu, box_decode, conv2d_epilogue, focal_loss, fpn_merge,  # noqa: E402
                            match_anchors, nms, upsample_nearest_add)

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin: A100 163 KiB, H100/H200
# 227 KiB) and registers per block, per compute capability.
SHARED_LIMIT = {80: 166912, 90: 232448}
REGISTERS_PER_BLOCK = 65536
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def meta(shape, dtype=torch.float32, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def layout(channels_last):
    return "NHWC" if channels_last else "NCHW"


# ---------------------------------------------------------------------------------------------------
# Cases: each calls real launchers on meta tensors. Shapes are RetinaNet R50-FPN's at 800 x 1216, batch
# 2 (C3: 512 x 100 x 152, P3-P4: 256 x 100 x 152 / 50 x 76), so Triton specialises as it would there;
# the int64 cases use one image past 2**31 elements, which only a meta tensor makes free.
# ---------------------------------------------------------------------------------------------------

def _upsample_nearest_add_cases():
    for dtype in FLOATS:
        for channels_last in (False, True):
            label = f"{SHORT[dtype]} {layout(channels_last)}"
            lateral = meta((2, 256, 100, 152), dtype, channels_last)
            top = meta((2, 256, 50, 76), dtype, channels_last)
            yield label, False, lambda lateral=lateral, top=top: upsample_nearest_add.upsample_nearest_add(
                top, lateral, lateral)
            yield label, False, lambda lateral=lateral: upsample_nearest_add.upsample_nearest_backward(
                lateral, 50, 76)


def _fpn_merge_cases():
    # Every config for bf16 (tensor cores), f32 (FMA) and f64 (its own list); the pinned one elsewhere.
    for dtype in FLOATS:
        for channels_last in (False, True):
            for big in (False, True):
                if big and channels_last:
                    continue
                if big:
                    x = meta((1, 256, 3072, 3072), dtype)
                    top = meta((1, 256, 1536, 1536), dtype)
                else:
                    x = meta((2, 512, 100, 152), dtype, channels_last)
                    top = meta((2, 256, 50, 76), dtype, channels_last)
                weight = meta((256, x.shape[1], 1, 1), dtype)
                bias = meta((256,), dtype) if not channels_last else None
                all_configs = dtype != torch.float16 and not channels_last and not big
                label = (f"{SHORT[dtype]} {layout(channels_last)} {'i64' if big else 'i32'}"
                         f"{' bias' if bias is not None else ''}")
                yield label, all_configs, lambda x=x, w=weight, b=bias, t=top: fpn_merge.fpn_merge(x, w, b, t)
    # Under CUDA autocast a 16-bit conv meets a float32 top (autocast upsamples in float32): a float32 output.
    for dtype in (torch.float16, torch.bfloat16):
        x, top = meta((2, 512, 100, 152), dtype), meta((2, 256, 50, 76), torch.float32)
        weight, bias = meta((256, 512, 1, 1), dtype), meta((256,), dtype)
        yield f"{SHORT[dtype]} x, f32 top NCHW i32 bias", False, \
            lambda x=x, w=weight, b=bias, t=top: fpn_merge.fpn_merge(x, w, b, t)


def _conv_cases():
    for dtype in FLOATS:
        for channels_last in (True, False):
            for big in (False, True):
                if big and not channels_last:
                    continue
                if big:  # one image past 2**31 elements: int64 offsets inside the image
                    x = meta((1, 256, 3072, 3072), dtype, channels_last)
                else:
                    x = meta((2, 256, 50, 76), dtype, channels_last)
                weight = meta((256, 256, 3, 3), dtype)
                scale, shift = meta((256,)), meta((256,))
                out_hw = x.shape[2:]
                residual = meta((x.shape[0], 256, *out_hw), dtype, True) if channels_last else None
                all_configs = dtype != torch.float16 and channels_last and not big
                label = (f"{SHORT[dtype]} {layout(channels_last)} {'i64' if big else 'i32'}"
                         f"{' residual' if residual is not None else ''}")
                yield label, all_configs, lambda x=x, w=weight, s=scale, b=shift, r=residual: (
                    conv2d_epilogue.conv2d_epilogue(x, w, s, b, r, True, 1, 2, 2))


def _bn_cases():
    for dtype in FLOATS:
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        for channels_last in (False, True):
            for big in (False, True):
                shape = (8, 256, 1024, 1152) if big else (2, 256, 100, 152)
                y = meta(shape, dtype, channels_last)
                affine = not big  # the int64 cases also cover BatchNorm without weight and bias
                weight = meta((256,)) if affine else None
                bias = meta((256,)) if affine else None
                residual = meta(shape, dtype, channels_last) if affine else None
                mean, invstd = meta((256,), stat), meta((256,), stat)
                label = (f"{SHORT[dtype]} {layout(channels_last)} {'i64' if big else 'i32'}"
                         f"{' affine residual' if affine else ''}")
                yield label, False, lambda y=y, w=weight, b=bias, r=residual: (
                    bn_relu.bn_relu_forward(y, w, b, r, 1e-5, True))
                yield label, False, lambda y=y, w=weight, m=mean, s=invstd, r=residual is not None: (
                    bn_relu.bn_relu_backward(y, y, y, m, s, w, True, r))
        y = meta((2, 256, 100, 152), dtype)
        yield f"{SHORT[dtype]} NCHW no ReLU", False, lambda y=y, s=stat: bn_relu.bn_relu_backward(
            y, y, y, meta((256,), s), meta((256,), s), None, False, False)


def _focal_loss_cases():
    rows, classes = 2 * 180000, 80  # anchors of a batch by classes
    for dtype in FLOATS:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        logits = meta((rows, classes), dtype)
        yield f"{SHORT[dtype]} targets sum grad", False, lambda x=logits: focal_loss.sigmoid_focal_loss(
            x, x, None, None, 0.25, 2.0, -100, True, True)
        labels = meta((rows,), torch.int64)
        weight = meta((rows, 1), compute).expand(rows, classes)
        yield f"{SHORT[dtype]} labels weight none", False, lambda x=logits, l=labels, w=weight: (
            focal_loss.sigmoid_focal_loss(x, None, l, w, 0.25, 2.0, -100, False, False))


def _box_decode_cases():
    weights, means, stds = (1.0, 1.0, 1.0, 1.0), (0.0,) * 4, (1.0,) * 4
    anchors = meta((120000, 4))
    for dtype in FLOATS:
        deltas = meta((2, 120000, 4), dtype)
        sizes = meta((2, 2), torch.float64 if dtype == torch.float64 else torch.float32)
        for style, clip in ((0, "none"), (0, "one"), (1, "per image")):
            image_sizes = sizes if clip == "per image" else None
            image_size = [800.0, 1216.0] if clip == "one" else []
            yield f"{SHORT[dtype]} {'mmdet' if style else 'torchvision'} clip {clip}", False, (
                lambda a=anchors.to(dtype), d=deltas, s=image_sizes, st=style, i=image_size:
                box_decode.decode_boxes(a, d, s, st, weights, means, stds, -4.135, 4.135, 1e8, i))


def _nms_cases():
    for dtype in FLOATS:
        boxes = meta((2, 1000, 4), dtype)
        counts = meta((2,), torch.int64)
        yield f"{SHORT[dtype]}", False, lambda b=boxes, c=counts: nms.iou_mask(b, None, c, 0.5)
        yield f"{SHORT[dtype]} labels", False, lambda b=boxes, c=counts: nms.iou_mask(
            b, meta((2, 1000), torch.int64), c, 0.5)
    # The greedy reduction of the mask: one int64 layout, whatever the boxes' dtype was.
    yield "reduce", False, lambda: nms.reduce_mask(meta((2, 1000, 16), torch.int64), meta((2,), torch.int64))


def _match_anchors_cases():
    # 16 images of a 1024x1024 batch (196,416 anchors each), 100 boxes per image; shared and per-image anchors.
    for dtype in (torch.float32, torch.float64):
        gt, counts = meta((16, 100, 4), dtype), meta((16,), torch.int64)
        for per_image in (False, True):
            anchors = meta((16 if per_image else 1, 196416, 4), dtype)
            for low_quality in (True, False):
                yield f"{SHORT[dtype]} {'per-image' if per_image else 'shared'} anchors low-quality {low_quality}", \
                    False, lambda a=anchors, g=gt, c=counts, q=low_quality: match_anchors.match_anchors(
                        a, g, c, 0.5, 0.4, q)


CASES = [_upsample_nearest_add_cases, _fpn_merge_cases, _conv_cases, _bn_cases, _focal_loss_cases, _box_decode_cases,
         _nms_cases, _match_anchors_cases]


# ---------------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------------

class Launch:
    def __init__(self, case, fn, args, kwargs):
        self.case, self.fn, self.args, self.kwargs = case, fn, args, kwargs


@contextlib.contextmanager
def recording(case, launches):
    """Launches of @triton.jit kernels and autotuners inside the block go to `launches` (one per config
    of an autotuner) instead of running."""
    def jit_run(fn, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, fn, args, kwargs))

    def autotuner_run(tuner, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        if not isinstance(tuner.fn, JITFunction):
            raise TypeError(f"{case}: the autotuner wraps {type(tuner.fn).__name__}, not a @triton.jit kernel")
        for config in tuner.configs:
            launches.append(Launch(case, tuner.fn, args, {**kwargs, **config.all_kwargs()}))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def record_all(only):
    launches = []
    for make_cases in CASES:
        family = make_cases.__name__.strip("_").removesuffix("_cases")
        for label, all_configs, call in make_cases():
            case = f"{family}: {label}"
            if only not in case:
                continue
            os.environ[_common.AUTOTUNE_VARIABLE] = "1" if all_configs else "0"
            before = len(launches)
            with recording(case, launches):
                call()
            if len(launches) == before:  # an empty shape or a wrong argument would check nothing
                sys.exit(f"case {case!r} launched no kernel")
    return launches


# ---------------------------------------------------------------------------------------------------
# Binding: what a real launch on `arch` would compile, by Triton's own binder
# ---------------------------------------------------------------------------------------------------

class Job:
    def __init__(self, launch, arch, signature, constexprs, attrs, options):
        self.launch, self.arch = launch, arch
        self.signature, self.constexprs, self.attrs, self.options = signature, constexprs, attrs, options
        self.cases = [launch.case]

    @property
    def name(self):
        return self.launch.fn.__name__

    def key(self):
        return (self.name, self.arch, repr(self.signature), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))


@functools.cache
def _binder(fn, arch):
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def bind(launch, arch):
    fn = launch.fn
    backend, binder = _binder(fn, arch)
    kwargs = dict(launch.kwargs)
    # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Job(launch, arch, signature, constexprs, attrs, dict(options.__dict__))


def specialisation(job):
    """Which integer arguments Triton made constexpr 1, and which arguments it marked divisible by 16."""
    params = job.launch.fn.params
    ones = tuple(p.name for p in params if not p.is_constexpr and job.signature[p.name] == "constexpr")
    div16 = tuple(params[path[0]].name for path, values in job.attrs.items()
                  if len(path) == 1 and any(v[0] == "tt.divisibility" for v in values))
    return ones, div16


def config_text(job):
    blocks = "x".join(str(job.constexprs[(i,)]) for i, p in enumerate(job.launch.fn.params)
                      if p.name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    text = f"w{job.options['num_warps']} s{job.options['num_stages']}"
    return f"{blocks} {text}" if blocks else text


# ---------------------------------------------------------------------------------------------------
# Compiling (in worker processes forked after the jobs are made)
# ---------------------------------------------------------------------------------------------------

JOBS = []
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_job(index):
    job = JOBS[index]
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(job.launch.fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as error:  # every kind of compile failure is a result to report
        text = f"{type(error).__name__}: {error}".strip()
        if error.__cause__ is not None:  # a CompilationError shows the source line, its cause says why
            text += f"\n    caused by {type(error.__cause__).__name__}: {error.__cause__}"
        return dict(error=text[-3000:], seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    spills = [tuple(map(int, m)) for m in _SPILLS.findall(log.getvalue())]
    if not spills:
        return dict(error="ptxas printed no -v report (TRITON_DUMP_PTXAS_LOG had no effect)", seconds=seconds)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    found = _RESOURCES.search(usage)
    if found is None:
        return dict(error=f"no resource usage in cuobjdump's output: {usage!r}", seconds=seconds)
    registers, stack, _, local = map(int, found.groups())
    return dict(shared=compiled.metadata.shared, registers=registers, stack=stack, local=local,
                spill_stores=sum(s for s, _ in spills), spill_loads=sum(l for _, l in spills),
                num_warps=compiled.metadata.num_warps, seconds=seconds)


def problems(job, result):
    if "error" in result:
        return [result["error"]]
    found = []
    if result["shared"] > SHARED_LIMIT[job.arch]:
        found.append(f"shared memory {result['shared']} B over sm_{job.arch}'s {SHARED_LIMIT[job.arch]} B")
    threads = 32 * result["num_warps"]
    if result["registers"] * threads > REGISTERS_PER_BLOCK:
        found.append(f"{result['registers']} registers x {threads} threads over {REGISTERS_PER_BLOCK} per block")
    return found


def defined_kernels():
    """(module, name) of every @triton.jit function named *_kernel in kernels/*.py."""
    kernels = set()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        module = importlib.import_module(f"fastbb.kernels.{path.stem}")
        if Path(module.__file__).resolve() != path.resolve():
            sys.exit(f"fastbb.kernels.{path.stem} is imported from {module.__file__}, not from {path}: "
                     "install this checkout (pip install -e .)")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.__module__ == module.__name__:
                kernels.add((module.__name__, name))
    return kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles (default: cores)")
    parser.add_argument("--arch", default="90,80", help="compute capabilities (default: 90,80)")
    parser.add_argument("--only", default="", help="only the cases whose 'family: label' contains this text "
                        "(skips the check that every kernel is covered)")
    args = parser.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        sys.exit(f"--arch: no shared-memory limit known for {unknown}; known: {sorted(SHARED_LIMIT)}")
    wall = time.perf_counter()
    print(f"Triton {triton.__version__}, torch {torch.__version__}; targets "
          f"{', '.join(f'sm_{a}' for a in archs)}; {args.jobs} parallel compiles")

    launches = record_all(args.only)
    unique = {}
    for launch in launches:
        for arch in archs:
            job = bind(launch, arch)
            known = unique.setdefault(job.key(), job)
            if known is not job and launch.case not in known.cases:
                known.cases.append(launch.case)
    JOBS.extend(unique.values())

    print(f"\n{len(launches)} launches recorded, {len(JOBS)} distinct compiles. What Triton specialised, per "
          "kernel: '==1' integer arguments made constexpr 1, '%16' arguments known to be divisible by 16:")
    patterns = {}
    for job in JOBS:
        cases = patterns.setdefault(job.name, {}).setdefault(specialisation(job), [])
        cases.extend(case.split(": ", 1)[1] for case in job.cases if case.split(": ", 1)[1] not in cases)
    for name, by_pattern in patterns.items():
        print(f"  {name}")
        for (ones, div16), cases in by_pattern.items():
            print(f"    ==1: {', '.join(ones) or '-'}; %16: {', '.join(div16) or '-'}\n"
                  f"      in: {'; '.join(cases)}")

    context = multiprocessing.get_context("fork")  # the workers inherit JOBS
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        results = list(pool.map(compile_job, range(len(JOBS))))

    failures = []
    rows = []
    for job, result in zip(JOBS, results):
        for problem in problems(job, result):
            failures.append(f"{job.name} [{job.launch.case}, {config_text(job)}, sm_{job.arch}]: {problem}")
        ok = "error" not in result
        rows.append((job.name, job.launch.case.split(": ", 1)[1], config_text(job), f"sm_{job.arch}",
                     str(result["shared"]) if ok else "-", str(result["registers"]) if ok else "-",
                     str(result["stack"]) if ok else "-",
                     f"{result['spill_stores']}/{result['spill_loads']}" if ok else "-",
                     f"{result['seconds']:.1f}", "" if not problems(job, result) else "FAIL"))
    header = ("kernel", "case", "config", "arch", "shared B", "regs", "stack B", "spill st/ld B", "s", "")
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print()
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())

    missing = set() if args.only else defined_kernels() - {(job.launch.fn.__module__, job.name) for job in JOBS}
    for module, name in sorted(missing):
        failures.append(f"{module}.{name}: no case launched it; add one to {Path(__file__).name}")
    compile_seconds = sum(r["seconds"] for r in results)
    print(f"\n{len(JOBS)} compiles ({compile_seconds:.0f} s of compile time) of {len(defined_kernels())} kernels "
          f"in {time.perf_counter() - wall:.0f} s wall")
    if failures:
        print(f"\nFAILED ({len(failures)}):")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print("all kernels compile within the targets' limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
