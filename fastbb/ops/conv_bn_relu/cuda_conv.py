"""conv_bn_relu's eval conv on CUDA: cuDNN's fused conv + bias (+ add) + ReLU ("cudnn"), the Triton
implicit-GEMM conv with the shift, residual and ReLU in its epilogue ("triton", fastbb.kernels.conv2d_epilogue),
and the per-shape choice among them and the plain conv with its in-place add and ReLU (the reference), timed
at each shape's first call: the eval table's pick.

The functions take the eval table's arguments (x, weight, shift, residual, stride, padding, dilation, groups,
relu, packed_weights), the BN folded into weight and shift, and need no autograd.
"""
import functools

import torch

from fastbb.ops._common import memory_format

_CUDA_EVAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HAS_CUDNN_FUSED = hasattr(torch, "cudnn_convolution_relu") and hasattr(torch, "cudnn_convolution_add_relu")


def cudnn_eval_applies(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    """With relu only (the fused ops always apply it). They pass deterministic=False to cuDNN whatever
    torch's setting, so they stay out when determinism is asked for; their residual must have x's dtype
    (the plain add casts it)."""
    return (relu and x.dtype in _CUDA_EVAL_DTYPES and _HAS_CUDNN_FUSED and torch.backends.cudnn.enabled
            and not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
            and (residual is None or residual.dtype == x.dtype))


def cudnn_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, shift, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, shift, stride, padding, dilation, groups)


def _conv_output_format(x, weight):
    # cuDNN's rule (F.conv2d and the fused cuDNN ops alike): channels_last when x or the weight is.
    if torch.channels_last in (memory_format(x), memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def triton_eval_applies(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    return groups == 1 and x.dtype in _CUDA_EVAL_DTYPES


def triton_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    from fastbb.kernels import conv2d_epilogue
    scale = torch.ones(weight.shape[0], dtype=torch.float32, device=x.device)  # the BN scale is in the weight
    out = conv2d_epilogue.conv2d_epilogue(x, weight, scale, shift.float(), residual, relu, stride, padding, dilation)
    # The kernel writes channels_last; every candidate returns eager's layout, whichever one runs.
    return out.contiguous(memory_format=_conv_output_format(x, weight))


def _time_candidate(fn, warmup=2, repeats=5):
    """Milliseconds per call of fn on the current CUDA stream: the mean of `repeats` calls after `warmup`
    (which also absorb cuDNN's and Triton's own first-call autotuning and compilation)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _can_time():
    # Timing runs the candidates and waits for the device: impossible inside a CUDA graph capture, and
    # meaningless while torch.compile traces with fake tensors.
    return not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


def _same_layout(out, reference):
    return (out.shape == reference.shape and out.dtype == reference.dtype
            and memory_format(out) == memory_format(reference))


class _ConvAlgorithmCache:
    """The fastest implementation of the eval conv per shape, timed at the first call of each key and
    remembered, as torch.backends.cudnn.benchmark does for cuDNN's algorithms.

    Timed rather than ruled: cuDNN's fused conv + bias (+ add) + ReLU wins on some shapes, the Triton
    implicit-GEMM conv with its epilogue on others, and on others still the plain cuDNN conv followed by the
    in-place add and ReLU (cuDNN's fused engines do not cover every shape as well as its plain ones). The
    winner moves with channels, spatial size, stride, dtype, layout and GPU, and no static rule holds
    across them. Like cudnn.benchmark, the choice (and so the rounding of the result) can differ between
    runs when two candidates time alike; force a backend for a fixed one.
    """

    def __init__(self):
        self._winners = {}

    def choose(self, key, candidates):
        """The name of the candidate to run for `key`.

        candidates: {name: zero-argument callable}, "reference" (the implementation that always works)
        first. A candidate that raises on its trial, or returns another shape, dtype or layout than the
        reference, is dropped for this key. Without timing (compiling, capturing a CUDA graph): the
        remembered winner, else the reference.
        """
        if len(candidates) == 1:
            return "reference"
        winner = self._winners.get(key)
        if winner in candidates:
            return winner
        if not _can_time():
            return "reference"
        reference = candidates["reference"]()
        timings = {"reference": _time_candidate(candidates["reference"])}
        for name, fn in candidates.items():
            if name == "reference":
                continue
            try:
                if _same_layout(fn(), reference):
                    timings[name] = _time_candidate(fn)
            except Exception:  # no kernel for this shape, dtype or layout, or out of memory: keep the others
                continue
        winner = min(timings, key=timings.get)  # the reference comes first: it wins ties
        self._winners[key] = winner
        return winner


_conv_algorithms = _ConvAlgorithmCache()


def fastest(reference, candidates, args):
    """The implementation to run for this CUDA eval call: the fastest for its shape of the reference and the
    applicable candidates (the table's Implementations), timed once per shape."""
    x, weight, shift, residual, stride, padding, dilation, groups, relu, _ = args
    implementations = {"reference": reference, **{i.backend: i for i in candidates}}
    key = (x.device, x.dtype, memory_format(x), memory_format(weight), tuple(x.shape), tuple(weight.shape), stride,
           padding, dilation, groups, None if residual is None else (residual.dtype, memory_format(residual)), relu)
    with torch.cuda.device(x.device):  # time, and check for a capture, on x's device
        name = _conv_algorithms.choose(key, {name: functools.partial(i.run, *args)
                                            for name, i in implementations.items()})
    return implementations[name]
