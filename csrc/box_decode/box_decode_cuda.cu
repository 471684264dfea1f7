// CUDA kernel of fastbb_C::decode_boxes (schema in fastbb/ops/box_decode.py): one thread per box.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#define FASTBB_BOX_DECODE_OP
#include "box_decode/box_decode.h"

namespace fastbb {
namespace {

// Four values of one box. When every buffer is 16-byte aligned (the usual case: boxes start at
// multiples of 4 elements), float boxes move as one float4 load / store.
template <typename scalar_t>
struct Box4 {
  scalar_t v[4];
};

template <bool kVector, typename scalar_t>
__device__ __forceinline__ Box4<scalar_t> load_box(const scalar_t* p) {
  Box4<scalar_t> b;
  if constexpr (kVector && std::is_same<scalar_t, float>::value) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    b.v[0] = q.x; b.v[1] = q.y; b.v[2] = q.z; b.v[3] = q.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) b.v[i] = p[i];
  }
  return b;
}

template <bool kVector, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_box(scalar_t* p, const acc_t* v) {
  if constexpr (kVector && std::is_same<scalar_t, float>::value) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = static_cast<scalar_t>(v[i]);
  }
}

template <typename scalar_t, bool kVector>
__global__ void decode_boxes_kernel(const scalar_t* __restrict__ anchors, const scalar_t* __restrict__ deltas,
                                    const at::opmath_type<scalar_t>* __restrict__ image_sizes,
                                    BoxDecodeParams params, int64_t num_boxes, int64_t boxes_per_row,
                                    int64_t num_anchors, int64_t boxes_per_image, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t box = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (box >= num_boxes) return;
  if (image_sizes != nullptr) {
    const int64_t image = box / boxes_per_image;
    params.clip_h = static_cast<double>(image_sizes[2 * image]);
    params.clip_w = static_cast<double>(image_sizes[2 * image + 1]);
  }
  const int64_t anchor = (box / boxes_per_row) % num_anchors;
  const Box4<scalar_t> a = load_box<kVector>(anchors + 4 * anchor);
  const Box4<scalar_t> d = load_box<kVector>(deltas + 4 * box);
  acc_t decoded[4];
  decode_box<acc_t>(a.v, d.v, params, decoded);
  store_box<kVector>(out + 4 * box, decoded);
}

at::Tensor decode_boxes_cuda(const at::Tensor& anchors, const at::Tensor& deltas,
                             const c10::optional<at::Tensor>& image_sizes, int64_t style,
                             at::ArrayRef<double> weights, at::ArrayRef<double> means,
                             at::ArrayRef<double> stds, double dwh_min, double dwh_max, double dxy_max,
                             at::ArrayRef<double> image_size) {
  check_decode_boxes_args(anchors, deltas, image_sizes, c10::DeviceType::CUDA);
  TORCH_CHECK(anchors.device() == deltas.device(), "fastbb.decode_boxes: anchors and deltas must be on one device");
  const BoxDecodeParams params =
      make_decode_params(style, weights, means, stds, dwh_min, dwh_max, dxy_max, image_size, image_sizes);
  const c10::cuda::CUDAGuard guard(deltas.device());
  const at::Tensor anchors_c = anchors.contiguous();
  const at::Tensor deltas_c = deltas.contiguous();
  c10::optional<at::Tensor> sizes_c;
  if (image_sizes.has_value()) sizes_c = image_sizes->contiguous();
  at::Tensor out = at::empty_like(deltas_c);
  const int64_t num_boxes = deltas_c.numel() / 4;
  if (num_boxes == 0) return out;
  const int64_t boxes_per_row = deltas_c.size(-1) / 4;
  const int64_t num_images = sizes_c.has_value() ? sizes_c->size(0) : 1;
  constexpr int kThreads = 256;
  const int64_t blocks = (num_boxes + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 0x7fffffff, "fastbb.decode_boxes: too many boxes for one launch: ", num_boxes);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, deltas.scalar_type(), "decode_boxes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* anchor_data = anchors_c.const_data_ptr<scalar_t>();
    const scalar_t* delta_data = deltas_c.const_data_ptr<scalar_t>();
    const acc_t* size_data = sizes_c.has_value() ? sizes_c->const_data_ptr<acc_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const bool aligned = (reinterpret_cast<uintptr_t>(anchor_data) | reinterpret_cast<uintptr_t>(delta_data) |
                          reinterpret_cast<uintptr_t>(out_data)) % 16 == 0;
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          anchor_data, delta_data, size_data, params, num_boxes, boxes_per_row, anchors_c.size(0),
          num_boxes / num_images, out_data);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (aligned) {
      launch(decode_boxes_kernel<scalar_t, true>);
    } else {
      launch(decode_boxes_kernel<scalar_t, false>);
    }
  });
  return out;
}

}  // namespace
}  // namespace fastbb

TORCH_LIBRARY_IMPL(fastbb_C, CUDA, m) { m.impl("decode_boxes", &fastbb::decode_boxes_cuda); }
