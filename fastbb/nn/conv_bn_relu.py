"""FrozenBatchNorm2d (torchvision's) and ConvBNReLU2d: a Conv2d -> BatchNorm -> [ReLU] chain run as one
fastbb.ops.conv_bn_relu call, its submodules kept under their original names so state_dicts load unchanged."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbb._tracing import not_scriptable, traced
from fastbb.nn.sync_batch_norm import _sync_batch_norm_train
from fastbb.ops._common import autocast_dtype
from fastbb.ops.conv_bn_relu import conv_bn_relu


class FrozenBatchNorm2d(nn.Module):
    """
    torchvision.ops.FrozenBatchNorm2d: BatchNorm2d where the batch statistics and the affine parameters are
    fixed (all four are buffers).

    out = x * scale + shift with scale = weight * rsqrt(running_var + eps), shift = bias - running_mean *
    scale; eps is read at every call (it may be changed after construction). num_batches_tracked in a
    state_dict is dropped on load, as torchvision does. A conv followed by it runs fused in
    :class:`ConvBNReLU2d` and the fused models.

    Args:
        num_features (int): Number of features ``C`` from an expected input of size ``(N, C, H, W)``.
        eps (float): a value added to the denominator for numerical stability. Default: 1e-5.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor[N, C, H, W]): the input.

        Returns:
            Tensor[N, C, H, W]: the normalized input.
        """
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


def _is_frozen(bn):
    return type(bn).__name__ == "FrozenBatchNorm2d"  # fastbb's or torchvision's


@not_scriptable
class ConvBNReLU2d(nn.Module):
    """
    ``relu(bn(conv(x)) [+ residual])`` in one :func:`fastbb.ops.conv_bn_relu` call: what
    ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), nn.ReLU())`` computes (fastbb's own module; it
    replaces such chains, e.g. torchvision's Conv2dNormActivation, in :func:`fastbb.convert`).

    Holds an nn.Conv2d, a BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d and optionally a ReLU under the
    names given, so that state_dicts keep their keys (:meth:`from_modules` wraps existing modules). The BN
    mode follows the module: training (batch statistics, running stats updated as nn.BatchNorm2d does),
    eval, or frozen. SyncBatchNorm training across processes all-reduces the batch statistics itself
    (fastbb.nn.sync_batch_norm), on any device.

    Args:
        in_channels (int): the conv's input channels.
        out_channels (int): the conv's output channels.
        kernel_size (int or Tuple[int, int]): the conv's kernel size.
        stride (int or Tuple[int, int]): the conv's stride. Default: 1.
        padding (int or Tuple[int, int]): the conv's zero padding. Default: 0.
        dilation (int or Tuple[int, int]): the conv's dilation. Default: 1.
        groups (int): the conv's groups. Default: 1.
        bias (bool): whether the conv has a bias. Default: False.
        relu (bool): whether a ReLU follows the BN. Default: True.
        eps (float): the BatchNorm2d's eps. Default: 1e-5.
        momentum (float): the BatchNorm2d's momentum. Default: 0.1.
        names (Sequence[str]): the names of the conv, the BN and the ReLU. Default: ("conv", "bn", "relu").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, relu: bool = True,
                 eps: float = 1e-5, momentum: float = 0.1, names: Sequence[str] = ("conv", "bn", "relu")) -> None:
        super().__init__()
        self._names = tuple(names)
        self.add_module(self._names[0], nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                                  groups, bias=bias))
        self.add_module(self._names[1], nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum))
        if relu:
            self.add_module(self._names[2], nn.ReLU(inplace=True))

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module, relu: nn.ReLU | None = None,
                     names: Sequence[str] = ("conv", "bn", "relu")) -> "ConvBNReLU2d":
        """
        Wraps existing modules: their parameters and buffers are shared, not copied.

        Args:
            conv (nn.Conv2d): the conv, with zero padding given as numbers.
            bn (nn.Module): a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d (torchvision's or fastbb's)
                with the conv's output channels.
            relu (nn.ReLU, optional): the ReLU, if one follows.
            names (Sequence[str]): the names of the three modules, e.g. ("0", "1", "2") to keep an
                nn.Sequential's keys. Default: ("conv", "bn", "relu").

        Returns:
            ConvBNReLU2d: the module holding them.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"fastbb.nn.ConvBNReLU2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"fastbb.nn.ConvBNReLU2d: only zero padding given as numbers is supported, got "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) or _is_frozen(bn)):
            raise TypeError(f"fastbb.nn.ConvBNReLU2d: bn must be a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d, "
                            f"got {type(bn).__name__}")
        features = bn.weight.shape[0] if _is_frozen(bn) else bn.num_features
        if features != conv.out_channels:
            raise ValueError(f"fastbb.nn.ConvBNReLU2d: bn has {features} features but conv has {conv.out_channels} "
                             f"output channels")
        if relu is not None and not isinstance(relu, nn.ReLU):
            raise TypeError(f"fastbb.nn.ConvBNReLU2d: relu must be an nn.ReLU or None, got {type(relu).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._names = tuple(names)
        module.add_module(module._names[0], conv)
        module.add_module(module._names[1], bn)
        if relu is not None:
            module.add_module(module._names[2], relu)
        return module

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """
        Args:
            x (Tensor[N, C_in, H, W]): the input.
            residual (Tensor[N, C_out, H_out, W_out], optional): added after the BN, before the ReLU.

        Returns:
            Tensor[N, C_out, H_out, W_out]: the output.
        """
        conv, bn = getattr(self, self._names[0]), getattr(self, self._names[1])
        return _fused_conv_bn(conv, bn, x, relu=hasattr(self, self._names[2]), residual=residual)


def _fusable(conv, bn):
    """Whether conv -> bn can run as one conv_bn_relu call (else it runs as the modules themselves)."""
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and (isinstance(bn, nn.modules.batchnorm._BatchNorm) or _is_frozen(bn)))


def _synchronizes(bn):
    """Whether bn is a SyncBatchNorm whose training batch statistics span more than this process (as
    nn.SyncBatchNorm decides: training mode, torch.distributed initialized, process group size > 1)."""
    return (isinstance(bn, nn.SyncBatchNorm) and bn.training and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size(bn.process_group) > 1)


def _count_batch_traced(tracer, bn, momentum):
    """Under torch.fx symbolic tracing, bn.num_batches_tracked's increment as a node of the graph (run at every
    call of the traced module, as nn.BatchNorm2d's is; an in-place aten op, so dead-code elimination keeps it),
    and the momentum: with momentum None, 1 / num_batches_tracked as a traced value too."""
    count = tracer.create_proxy("call_function", torch.ops.aten.add_.Scalar, (bn.num_batches_tracked, 1), {})
    if momentum is None:
        return tracer.create_proxy("call_function", _cumulative_momentum, (count,), {})
    return momentum


def _cumulative_momentum(num_batches_tracked):
    """nn.BatchNorm2d's momentum=None: the cumulative moving average's 1 / num_batches_tracked."""
    return 1.0 / float(num_batches_tracked)


def _frozen_promotes(x, bn):
    """Whether a FrozenBatchNorm2d returns another dtype than the conv before it: under autocast its
    ``x * scale + shift`` promotes the conv's autocast-dtype output to its buffers' float32 (torchvision's
    does the same), so a ResNet with frozen BNs keeps its residual stream in float32 between the convs.
    The fused op returns the conv's dtype, so such a pair runs as the modules themselves."""
    amp_dtype = autocast_dtype(x)
    return amp_dtype is not None and torch.promote_types(amp_dtype, bn.weight.dtype) != amp_dtype


def _fused_conv_bn(conv, bn, x, relu=True, residual=None):
    """relu(bn(conv(x)) [+ residual]) with the BN module's mode (training, eval, frozen), as one fused call;
    the modules' own forward when the pair is not fusable (e.g. GroupNorm) or, under autocast, is a
    FrozenBatchNorm2d that returns float32 (see _frozen_promotes). A SyncBatchNorm training across
    processes runs the conv, then fastbb's synchronized BN (torch's SyncBatchNorm is GPU-only)."""
    if not _fusable(conv, bn) or (_is_frozen(bn) and _frozen_promotes(x, bn)):
        out = bn(conv(x))
        if residual is not None:
            out += residual  # in place, as torchvision's blocks add it: the sum keeps out's dtype
        return torch.relu(out) if relu else out
    conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if _is_frozen(bn):
        return conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            eps=bn.eps, relu=relu, residual=residual, **conv_args)
    batch_statistics = bn.training or bn.running_mean is None
    momentum = bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if traced(x):
            momentum = _count_batch_traced(x.tracer, bn, momentum)
        else:
            bn.num_batches_tracked.add_(1)  # the one increment per forward, on every path below
            if momentum is None:
                momentum = _cumulative_momentum(bn.num_batches_tracked)
    use_running = not batch_statistics or (bn.training and bn.track_running_stats)
    running_mean = bn.running_mean if use_running else None
    running_var = bn.running_var if use_running else None
    if _synchronizes(bn):
        y = F.conv2d(x, conv.weight, conv.bias, **conv_args)
        return _sync_batch_norm_train(y, bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps,
                                     bn.process_group, residual=residual, relu=relu)
    return conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, running_mean, running_var,
                        training=batch_statistics, momentum=momentum, eps=bn.eps, relu=relu, residual=residual,
                        **conv_args)
