// CUDA kernel of fastbb_C::sigmoid_focal_loss (schema and the math in fastbb/ops/focal_loss.py): one thread
// per element of the (N, C) logits, several elements per thread in a grid-stride loop over one wave of
// blocks. With a reduction, each block writes one partial sum (a fixed-order tree in shared memory) and the
// partial sums are added by ATen's sum: no atomics, so repeated runs give the same bits, and nothing waits
// on the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "focal_loss/focal_loss_checks.h"

namespace fastbb {
namespace {

constexpr int kThreads = 256;

struct FocalParams {
  double alpha_pos;
  double alpha_neg;
  double gamma;
  int64_t ignore_index;
};

template <typename scalar_t, typename acc_t, bool kLabels, bool kWeight, bool kReduce, bool kGrad>
__global__ void focal_loss_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ targets,
                                  const int64_t* __restrict__ labels, const acc_t* __restrict__ weight,
                                  int64_t weight_row_stride, int64_t weight_col_stride, FocalParams params,
                                  int64_t total, int64_t num_classes, scalar_t* __restrict__ loss_out,
                                  acc_t* __restrict__ partial, scalar_t* __restrict__ grad_out) {
  const acc_t alpha_pos = static_cast<acc_t>(params.alpha_pos);
  const acc_t alpha_neg = static_cast<acc_t>(params.alpha_neg);
  const acc_t gamma = static_cast<acc_t>(params.gamma);
  const bool gamma_two = params.gamma == 2.0;
  acc_t thread_sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const acc_t x = static_cast<acc_t>(logits[i]);
    acc_t t;
    acc_t scale = 1;
    int64_t row = 0, col = 0;
    if constexpr (kLabels || kWeight) {
      row = i / num_classes;
      col = i - row * num_classes;
    }
    if constexpr (kLabels) {
      const int64_t label = labels[row];
      t = label == col ? acc_t(1) : acc_t(0);
      if (label == params.ignore_index) scale = 0;
    } else {
      t = static_cast<acc_t>(targets[i]);
    }
    if constexpr (kWeight) scale *= weight[row * weight_row_stride + col * weight_col_stride];
    const acc_t e = exp(-fabs(x));
    const acc_t d = acc_t(1) / (acc_t(1) + e);
    const acc_t p = x >= 0 ? d : e * d;
    const acc_t q = x >= 0 ? e * d : d;
    const acc_t log1p_e = log1p(e);
    const acc_t softplus_pos = (x > 0 ? x : acc_t(0)) + log1p_e;   // -log q
    const acc_t softplus_neg = (x < 0 ? -x : acc_t(0)) + log1p_e;  // -log p
    const acc_t ce = t * softplus_neg + (acc_t(1) - t) * softplus_pos;
    const acc_t m = p * (acc_t(1) - t) + q * t;
    acc_t m_gamma, m_gamma_1;
    if (gamma_two) {
      m_gamma = m * m;
      m_gamma_1 = m;
    } else {
      m_gamma = pow(m, gamma);
      // gamma = 0: no gamma term (PyTorch's pow backward is 0 for exponent 0); computing it would give
      // 0 * inf = NaN where m is subnormal and m^-1 overflows.
      m_gamma_1 = gamma == acc_t(0) ? acc_t(0)
                  : m > 0          ? pow(m, gamma - acc_t(1))
                                   : (gamma == acc_t(1) ? acc_t(1) : acc_t(0));
    }
    scale *= alpha_pos * t + alpha_neg * (acc_t(1) - t);
    const acc_t loss = scale * ce * m_gamma;
    if constexpr (kReduce) {
      thread_sum += loss;
    } else {
      loss_out[i] = static_cast<scalar_t>(loss);
    }
    if constexpr (kGrad) {
      grad_out[i] = static_cast<scalar_t>(
          scale * ((p - t) * m_gamma + gamma * ce * m_gamma_1 * p * q * (acc_t(1) - acc_t(2) * t)));
    }
  }
  if constexpr (kReduce) {
    __shared__ acc_t sums[kThreads];
    sums[threadIdx.x] = thread_sum;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sums[0];
  }
}

template <typename scalar_t, typename acc_t>
using FocalKernel = void (*)(const scalar_t*, const scalar_t*, const int64_t*, const acc_t*, int64_t, int64_t,
                             FocalParams, int64_t, int64_t, scalar_t*, acc_t*, scalar_t*);

template <typename scalar_t, typename acc_t, bool kLabels, bool kWeight>
FocalKernel<scalar_t, acc_t> focal_kernel_for(bool reduce, bool compute_grad) {
  if (reduce) {
    return compute_grad ? focal_loss_kernel<scalar_t, acc_t, kLabels, kWeight, true, true>
                        : focal_loss_kernel<scalar_t, acc_t, kLabels, kWeight, true, false>;
  }
  return compute_grad ? focal_loss_kernel<scalar_t, acc_t, kLabels, kWeight, false, true>
                      : focal_loss_kernel<scalar_t, acc_t, kLabels, kWeight, false, false>;
}

template <typename scalar_t, typename acc_t>
FocalKernel<scalar_t, acc_t> focal_kernel_for(bool labels, bool weight, bool reduce, bool compute_grad) {
  if (labels && weight) return focal_kernel_for<scalar_t, acc_t, true, true>(reduce, compute_grad);
  if (labels) return focal_kernel_for<scalar_t, acc_t, true, false>(reduce, compute_grad);
  if (weight) return focal_kernel_for<scalar_t, acc_t, false, true>(reduce, compute_grad);
  return focal_kernel_for<scalar_t, acc_t, false, false>(reduce, compute_grad);
}

// Blocks of the grid-stride loop: one full wave of `kernel` on the current device (the blocks of it that
// fit on an SM at once, from the occupancy API, times the SMs), fewer when the work is smaller. A fixed
// multiple of the SMs would leave a partial last wave whenever it is not a multiple of the occupancy.
int wave_blocks(const void* kernel, int64_t total) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int> resident_per_sm;  // per (kernel, device)
  const int device = c10::cuda::current_device();
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> guard(lock);
    const auto found = resident_per_sm.find({kernel, device});
    if (found != resident_per_sm.end()) {
      per_sm = found->second;
    } else {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      per_sm = std::max(per_sm, 1);
      resident_per_sm.emplace(std::make_pair(kernel, device), per_sm);
    }
  }
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * per_sm)));
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_cuda(
    const at::Tensor& logits, const c10::optional<at::Tensor>& targets, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weight, double alpha, double gamma, int64_t ignore_index, bool reduce,
    bool compute_grad) {
  const auto acc_dtype = check_focal_loss_args(logits, targets, labels, weight, gamma);
  const c10::cuda::CUDAGuard guard(logits.device());
  const FocalParams params{alpha >= 0 ? alpha : 1.0, alpha >= 0 ? 1.0 - alpha : 1.0, gamma, ignore_index};
  const int64_t total = logits.numel();
  const int64_t num_classes = logits.size(1);
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  if (total == 0) {
    return {reduce ? at::zeros({}, logits.options().dtype(acc_dtype)) : at::empty_like(logits), grad};
  }
  at::Tensor loss, partial;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t w0 = weight.has_value() ? weight->stride(0) : 0;
  const int64_t w1 = weight.has_value() ? weight->stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_focal_loss_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const FocalKernel<scalar_t, acc_t> kernel =
        focal_kernel_for<scalar_t, acc_t>(labels.has_value(), weight.has_value(), reduce, compute_grad);
    const int blocks = wave_blocks(reinterpret_cast<const void*>(kernel), total);
    if (reduce) {
      partial = at::empty({blocks}, logits.options().dtype(acc_dtype));
    } else {
      loss = at::empty_like(logits);
    }
    kernel<<<blocks, kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), targets.has_value() ? targets->const_data_ptr<scalar_t>() : nullptr,
        labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr,
        weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr, w0, w1, params, total, num_classes,
        reduce ? nullptr : loss.mutable_data_ptr<scalar_t>(), reduce ? partial.mutable_data_ptr<acc_t>() : nullptr,
        compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (reduce) {
    return {at::sum(partial), grad};
  }
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CUDA, m) { m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cuda); }

}  // namespace fastbb
