// Per-box decoding of regression deltas into x1y1x2y2 boxes, shared by every kernel that decodes boxes
// (the decode_boxes op on CPU and CUDA, and the RetinaNet post-processing kernels).
//
// Usage from C++ or CUDA:
//
//   #include "box_decode/box_decode.h"
//   fastbb::BoxDecodeParams p = fastbb::torchvision_decode_params();  // weights (1,1,1,1), clip log(1000/16)
//   p.clip = true; p.clip_w = image_w; p.clip_h = image_h;              // clip to the image, optional
//   float box[4];
//   fastbb::decode_box<float>(anchor /* x1,y1,x2,y2 */, delta /* dx,dy,dw,dh */, p, box);
//
// BoxDecodeParams (plain struct, trivially copyable: pass it by value to a CUDA kernel):
//   style        kTorchvision: torchvision BoxCoder.decode_single:
//                    w = x2 - x1, cx = x1 + 0.5 * w; d = delta / weights
//                kMmdet: mmdet DeltaXYWHBBoxCoder delta2bbox:
//                    w = x2 - x1, cx = (x1 + x2) * 0.5; d = delta * stds + means
//   weights[4]   divisors of (dx, dy, dw, dh), torchvision style only (nonzero)
//   stds[4], means[4]   mmdet style only
//   dwh_min, dwh_max    dw and dh are clamped to [dwh_min, dwh_max] before exp (use -INFINITY /
//                       INFINITY for "no bound"; torchvision: -inf and bbox_xform_clip; mmdet:
//                       +-|log(wh_ratio_clip)|, or -inf and +|log(wh_ratio_clip)| with add_ctr_clamp)
//   dxy_max      the centre shift dx * w (and dy * h) is clamped to [-dxy_max, dxy_max] (mmdet ctr_clamp;
//                INFINITY for none)
//   clip, clip_w, clip_h   when clip is true, x is clamped to [0, clip_w] and y to [0, clip_h] at the end
//                          (torchvision clip_boxes_to_image, mmdet clip_border with max_shape)
//
// decode_box<acc_t>(anchor, delta, params, out): reads 4 anchor values and 4 delta values (any
// element type convertible to acc_t, e.g. at::Half), computes in acc_t (float for fp16/bf16/fp32
// inputs, double for fp64) and writes 4 acc_t values. The operation order follows torchvision /
// mmdet so that fp32 results match theirs to the bit or within an ulp of exp. Clamps propagate NaN as
// torch.clamp does. On CUDA, products are rounded separately (no fused multiply-add) for the same reason.
//
// Defining FASTBB_BOX_DECODE_OP before including this header also declares the ATen-level argument
// checks of the decode_boxes op kernels; the per-box part above needs no ATen.
#pragma once

#include <cmath>
#include <type_traits>

#ifdef FASTBB_BOX_DECODE_OP
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTBB_HOST_DEVICE __host__ __device__
#else
#define FASTBB_HOST_DEVICE
#endif

namespace fastbb {

enum BoxDecodeStyle : int { kTorchvision = 0, kMmdet = 1 };

struct BoxDecodeParams {
  int style;
  double weights[4];
  double means[4];
  double stds[4];
  double dwh_min;
  double dwh_max;
  double dxy_max;
  bool clip;
  double clip_w;
  double clip_h;
};

// torchvision RetinaNet / Faster R-CNN defaults: weights (1, 1, 1, 1), dw/dh <= log(1000 / 16), no clip.
inline FASTBB_HOST_DEVICE BoxDecodeParams torchvision_decode_params(double wx = 1.0, double wy = 1.0,
                                                                    double ww = 1.0, double wh = 1.0) {
  BoxDecodeParams p{};
  p.style = kTorchvision;
  p.weights[0] = wx; p.weights[1] = wy; p.weights[2] = ww; p.weights[3] = wh;
  for (int i = 0; i < 4; ++i) { p.means[i] = 0.0; p.stds[i] = 1.0; }
  p.dwh_min = -INFINITY;
  p.dwh_max = 4.135166556742356;  // log(1000 / 16)
  p.dxy_max = INFINITY;
  p.clip = false;
  p.clip_w = 0.0;
  p.clip_h = 0.0;
  return p;
}

namespace detail {

// a * b rounded on its own: keeps nvcc from fusing it into a following add (torch rounds each op).
template <typename T>
inline FASTBB_HOST_DEVICE T mul(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) {
    return __fmul_rn(a, b);
  } else if constexpr (std::is_same<T, double>::value) {
    return __dmul_rn(a, b);
  } else {
    return a * b;
  }
#else
  return a * b;
#endif
}

// torch.clamp semantics: NaN stays NaN, an infinite bound is no bound.
template <typename T>
inline FASTBB_HOST_DEVICE T clamp_max(T v, T hi) { return v > hi ? hi : v; }
template <typename T>
inline FASTBB_HOST_DEVICE T clamp_min(T v, T lo) { return v < lo ? lo : v; }

template <typename T>
inline FASTBB_HOST_DEVICE T exp_(T v) {
#if defined(__CUDA_ARCH__)
  return exp(v);  // overloaded: expf for float, exp for double
#else
  return std::exp(v);
#endif
}

// d / weight, skipping the division for the common weight 1 (x / 1 == x exactly, NaN and inf included).
template <typename T>
inline FASTBB_HOST_DEVICE T divide_by_weight(T d, double weight) {
  return weight == 1.0 ? d : d / static_cast<T>(weight);
}

}  // namespace detail

// The two exponents of one box: its dw and dh, scaled and clamped. Split out of decode_box so that a
// kernel can evaluate the exps of many boxes at once (the CPU kernel does, with ATen's vectorized exp).
template <typename acc_t, typename delta_t>
inline FASTBB_HOST_DEVICE void decode_box_exponents(const delta_t* delta, const BoxDecodeParams& p,
                                                    acc_t* dwh) {
  using detail::mul;
  acc_t dw, dh;
  if (p.style == kTorchvision) {
    dw = detail::divide_by_weight(static_cast<acc_t>(delta[2]), p.weights[2]);
    dh = detail::divide_by_weight(static_cast<acc_t>(delta[3]), p.weights[3]);
  } else {
    dw = mul(static_cast<acc_t>(delta[2]), static_cast<acc_t>(p.stds[2])) + static_cast<acc_t>(p.means[2]);
    dh = mul(static_cast<acc_t>(delta[3]), static_cast<acc_t>(p.stds[3])) + static_cast<acc_t>(p.means[3]);
  }
  const acc_t dwh_min = static_cast<acc_t>(p.dwh_min);
  const acc_t dwh_max = static_cast<acc_t>(p.dwh_max);
  dwh[0] = detail::clamp_max(detail::clamp_min(dw, dwh_min), dwh_max);
  dwh[1] = detail::clamp_max(detail::clamp_min(dh, dwh_min), dwh_max);
}

// Decodes one box given exp(dw) and exp(dh) of decode_box_exponents.
template <typename acc_t, typename anchor_t, typename delta_t>
inline FASTBB_HOST_DEVICE void decode_box_scaled(const anchor_t* anchor, const delta_t* delta,
                                                 const BoxDecodeParams& p, acc_t exp_dw, acc_t exp_dh,
                                                 acc_t* out) {
  using detail::mul;
  const acc_t x1 = static_cast<acc_t>(anchor[0]);
  const acc_t y1 = static_cast<acc_t>(anchor[1]);
  const acc_t x2 = static_cast<acc_t>(anchor[2]);
  const acc_t y2 = static_cast<acc_t>(anchor[3]);
  const acc_t w = x2 - x1;
  const acc_t h = y2 - y1;
  const acc_t half = static_cast<acc_t>(0.5);
  acc_t cx, cy, dx, dy;
  if (p.style == kTorchvision) {
    cx = x1 + mul(half, w);
    cy = y1 + mul(half, h);
    dx = detail::divide_by_weight(static_cast<acc_t>(delta[0]), p.weights[0]);
    dy = detail::divide_by_weight(static_cast<acc_t>(delta[1]), p.weights[1]);
  } else {
    cx = mul(x1 + x2, half);
    cy = mul(y1 + y2, half);
    dx = mul(static_cast<acc_t>(delta[0]), static_cast<acc_t>(p.stds[0])) + static_cast<acc_t>(p.means[0]);
    dy = mul(static_cast<acc_t>(delta[1]), static_cast<acc_t>(p.stds[1])) + static_cast<acc_t>(p.means[1]);
  }
  acc_t shift_x = mul(dx, w);
  acc_t shift_y = mul(dy, h);
  const acc_t dxy_max = static_cast<acc_t>(p.dxy_max);
  shift_x = detail::clamp_min(detail::clamp_max(shift_x, dxy_max), -dxy_max);
  shift_y = detail::clamp_min(detail::clamp_max(shift_y, dxy_max), -dxy_max);
  const acc_t pred_cx = shift_x + cx;
  const acc_t pred_cy = shift_y + cy;
  const acc_t half_w = mul(half, mul(exp_dw, w));
  const acc_t half_h = mul(half, mul(exp_dh, h));
  acc_t bx1 = pred_cx - half_w;
  acc_t by1 = pred_cy - half_h;
  acc_t bx2 = pred_cx + half_w;
  acc_t by2 = pred_cy + half_h;
  if (p.clip) {
    const acc_t zero = static_cast<acc_t>(0);
    const acc_t cw = static_cast<acc_t>(p.clip_w);
    const acc_t ch = static_cast<acc_t>(p.clip_h);
    bx1 = detail::clamp_max(detail::clamp_min(bx1, zero), cw);
    by1 = detail::clamp_max(detail::clamp_min(by1, zero), ch);
    bx2 = detail::clamp_max(detail::clamp_min(bx2, zero), cw);
    by2 = detail::clamp_max(detail::clamp_min(by2, zero), ch);
  }
  out[0] = bx1;
  out[1] = by1;
  out[2] = bx2;
  out[3] = by2;
}

template <typename acc_t, typename anchor_t, typename delta_t>
inline FASTBB_HOST_DEVICE void decode_box(const anchor_t* anchor, const delta_t* delta,
                                          const BoxDecodeParams& p, acc_t* out) {
  acc_t dwh[2];
  decode_box_exponents<acc_t>(delta, p, dwh);
  decode_box_scaled<acc_t>(anchor, delta, p, detail::exp_(dwh[0]), detail::exp_(dwh[1]), out);
}

// Argument checks and parameter set-up shared by the CPU and CUDA kernels of fastbb_C::decode_boxes
// (the Python wrapper already validated everything; these guard direct calls of the private op).
#ifdef FASTBB_BOX_DECODE_OP
inline void check_decode_boxes_args(const at::Tensor& anchors, const at::Tensor& deltas,
                                    const c10::optional<at::Tensor>& image_sizes, c10::DeviceType device) {
  TORCH_CHECK(anchors.device().type() == device && deltas.device().type() == device,
              "fastbb.decode_boxes: anchors and deltas must be on ", device);
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 4, "fastbb.decode_boxes: anchors must be (A, 4), got ",
              anchors.sizes());
  TORCH_CHECK(deltas.dim() == 3 && deltas.size(1) == anchors.size(0) && deltas.size(2) % 4 == 0,
              "fastbb.decode_boxes: deltas must be (R, A, 4 * K) with A = ", anchors.size(0), ", got ",
              deltas.sizes());
  TORCH_CHECK(anchors.scalar_type() == deltas.scalar_type(), "fastbb.decode_boxes: anchors and deltas must have "
              "one dtype, got ", anchors.scalar_type(), " and ", deltas.scalar_type());
  if (image_sizes.has_value()) {
    const at::Tensor& sizes = *image_sizes;
    const auto acc = deltas.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(sizes.device() == deltas.device() && sizes.scalar_type() == acc && sizes.dim() == 2 &&
                    sizes.size(1) == 2 && sizes.size(0) > 0 &&
                    (deltas.size(0) * deltas.size(1)) % sizes.size(0) == 0,
                "fastbb.decode_boxes: image_sizes must be a (B, 2) ", acc, " tensor on ", deltas.device(),
                " with B dividing R * A = ", deltas.size(0) * deltas.size(1), ", got ", sizes.sizes(), " ",
                sizes.scalar_type());
  }
}

inline BoxDecodeParams make_decode_params(int64_t style, at::ArrayRef<double> weights,
                                          at::ArrayRef<double> means, at::ArrayRef<double> stds,
                                          double dwh_min, double dwh_max, double dxy_max,
                                          at::ArrayRef<double> image_size,
                                          const c10::optional<at::Tensor>& image_sizes) {
  TORCH_CHECK(style == kTorchvision || style == kMmdet, "fastbb.decode_boxes: unknown style ", style);
  TORCH_CHECK(weights.size() == 4 && means.size() == 4 && stds.size() == 4,
              "fastbb.decode_boxes: weights, means and stds must have 4 values each");
  TORCH_CHECK(image_size.empty() || image_size.size() == 2, "fastbb.decode_boxes: image_size must be [] or [h, w]");
  TORCH_CHECK(image_size.empty() || !image_sizes.has_value(),
              "fastbb.decode_boxes: pass image_size or image_sizes, not both");
  BoxDecodeParams p{};
  p.style = static_cast<int>(style);
  for (int i = 0; i < 4; ++i) {
    p.weights[i] = weights[i];
    p.means[i] = means[i];
    p.stds[i] = stds[i];
  }
  p.dwh_min = dwh_min;
  p.dwh_max = dwh_max;
  p.dxy_max = dxy_max;
  p.clip = !image_size.empty() || image_sizes.has_value();
  if (!image_size.empty()) {
    p.clip_h = image_size[0];
    p.clip_w = image_size[1];
  }
  return p;
}
#endif  // FASTBB_BOX_DECODE_OP

}  // namespace fastbb
