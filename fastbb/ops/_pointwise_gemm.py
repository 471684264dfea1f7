"""1x1 stride-1 convolutions on the CPU as MKL matrix products, one per image: (K, C) @ (C, H*W). Shared by
conv_bn_relu (eval and training) and fpn_merge (the lateral conv)."""
import torch


def is_pointwise_gemm(x, weight, stride, padding, groups):
    """A 1x1 stride-1 conv of NCHW float32 x on the CPU: a matrix product per image, (K, C) @ (C, H*W)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and tuple(weight.shape[2:]) == (1, 1)
            and stride == (1, 1) and padding == (0, 0) and groups == 1 and x.is_contiguous() and x.numel() > 0)


def pointwise_gemm_applies(x, weight, residual, stride, padding, groups):
    """Whether pointwise_conv_gemm runs this conv. MKL's GEMM runs a 1x1 stride-1 conv 1.0x to 1.9x faster
    than oneDNN's conv on NCHW (measured on a 2-core AVX2 CPU, ResNet-50's 1x1 convs at batch 1 and 2 at
    800x1344); with many small images (batch 8 at 14x14) the two are even."""
    return (is_pointwise_gemm(x, weight, stride, padding, groups)
            and (x.shape[0] == 1 or x.shape[2] * x.shape[3] >= 1024)
            and (residual is None or residual.dtype == torch.float32))


def pointwise_conv_gemm(x, weight, shift=None, residual=None, relu=False):
    """conv1x1(x, weight) + shift (+ residual) (+ ReLU) as one GEMM per image, NCHW in and out (no autograd).
    The shift is the GEMM's initial value. (GEMMs over blocks of pixels, with the residual and ReLU applied
    while a block is in cache, measured no faster on 800x1344 feature maps.)"""
    n, c, h, w = x.shape
    k = weight.shape[0]
    matrix = weight.reshape(k, c)
    out = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device)
    x_rows, out_rows = x.view(n, c, h * w), out.view(n, k, h * w)
    if residual is not None:
        torch.add(residual, 0 if shift is None else shift[:, None, None], out=out)
        for i in range(n):
            out_rows[i].addmm_(matrix, x_rows[i])
    elif shift is None:
        for i in range(n):
            torch.mm(matrix, x_rows[i], out=out_rows[i])
    else:
        for i in range(n):
            torch.addmm(shift[:, None], matrix, x_rows[i], out=out_rows[i])
    return out.relu_() if relu else out


def pointwise_gemm_train(x, weight, bias):
    """conv1x1(x, weight) + bias as one batched matrix product, with autograd (training)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    y = torch.bmm(weight.reshape(k, c).expand(n, k, c), x.view(n, c, h * w)).view(n, k, h, w)
    return y if bias is None else y + bias.view(1, k, 1, 1)
