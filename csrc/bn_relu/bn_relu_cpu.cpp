// CPU kernels of the fused training-mode BatchNorm (+ residual) + ReLU (schemas in
// fastbb/ops/conv_bn_relu/bn_relu_train.py):
//   fastbb_C::bn_relu_forward(y, weight?, bias?, residual?, eps, relu) -> (out, mean, invstd)
//       out = relu((y - mean) * invstd * weight + bias + residual), batch statistics per channel
//   fastbb_C::bn_relu_backward(grad_out, out, y, mean, invstd, weight?, relu, residual_grad)
//       -> (grad_y, grad_weight, grad_bias, grad_residual)
//
// y is contiguous NCHW or channels_last (NHWC in memory); the other activations are taken in y's format
// and the outputs are made in it. Values are computed in float32 (float64 for float64) and rounded once.
//
// Statistics: each channel's elements are cut into fixed pieces and segments that depend on the shape
// only. Per piece (NCHW: 2048 consecutive elements, read twice while in L1) or per segment (channels_last:
// a pivot per channel from the segment's first pixels), sums of deviations from a nearby value and of
// their squares give the mean and M2 in float64 without cancellation, so a mean of 10x the std costs
// nothing. Sums are float32 over at most 64 terms and float64 above; pieces and segments are merged in a
// fixed order with Chan's update in float64. The backward's two sums are float32 over a piece and
// float64 above it, in a fixed order too. Results therefore repeat bit for bit whatever the thread count.
//
// NCHW with enough channels to share among the threads, each channel is normalized right after its
// statistics, while (when it fits) it is still in L2, so y comes from memory once. Otherwise, and always
// for channels_last, where every pixel holds every channel, a statistics pass over all of y is followed
// by a normalizing pass. The backward is built alike: the two sums per channel, then grad_y (and
// grad_residual) from the same data.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace fastbb {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// NCHW: elements of one piece, 8 KiB of float32, so that its second read hits L1. Planes are cut into
// segments of kSegmentElements: the work items when channels are few or large.
constexpr int64_t kPieceElements = 2048;
constexpr int64_t kSegmentElements = 16384;
// channels_last: pixels are taken in blocks of about kBlockElements values (the widening buffers of
// 16-bit dtypes, which then stay in L1), float32 sums run over pieces of at most kMaxPiecePixels pixels,
// and segments hold about 2 * kSegmentElements values.
constexpr int64_t kBlockElements = 2048;
constexpr int64_t kMaxPiecePixels = 64;
// NCHW: channels are the work items, each normalized right after its statistics, when there are at least
// this many per thread (fewer would leave threads idle). A channel that fits L2 is then read from memory
// once; a larger one is read twice, as it would be by a statistics pass over all of y and a second pass.
constexpr int64_t kMinChannelsPerThread = 4;
// Threads get at least this many elements each: below it, starting them costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

// NCHW work item `item`, a (plane, segment) pair: its first element and length, with `segments` segments
// of kSegmentElements per plane of HW elements.
inline void segment_span(int64_t item, int64_t segments, int64_t HW, int64_t* start, int64_t* len) {
  const int64_t plane = item / segments, s = item - plane * segments;
  *start = plane * HW + s * kSegmentElements;
  *len = std::min(kSegmentElements, HW - s * kSegmentElements);
}

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_item));
}

// ---------------------------------------------------------------------------------------------------
// 16-bit dtypes are widened to float32 (simd::as_acc) and narrowed back once (simd::narrow); float32 and
// float64 are used in place.

using simd::as_acc;
using simd::narrow;

// Where results of acc_t are computed before they are stored as scalar_t: dst itself, or buffer.
template <typename scalar_t, typename acc_t>
acc_t* acc_target(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
void store_from(const acc_t* computed, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) narrow(computed, dst, n);
}

// Per-thread buffers of n values for 16-bit dtypes: the widened inputs (y, residual; or grad_out, out, y)
// and the outputs before they are narrowed (out; or grad_y, grad_residual). Empty for float32 and float64.
template <typename scalar_t>
struct Scratch {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kWidens = !std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> input[3], output[2];
  explicit Scratch(int64_t n) {
    if constexpr (kWidens) {
      for (auto& buffer : input) buffer.resize(n);
      for (auto& buffer : output) buffer.resize(n);
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Moments: count, mean and M2 (the sum of squared deviations from the mean), merged with Chan's update.

struct Moments {
  double count = 0, mean = 0, m2 = 0;
};

inline void merge_into(Moments& a, double count_b, double mean_b, double m2_b) {
  const double count = a.count + count_b;
  const double delta = mean_b - a.mean;
  a.mean += delta * (count_b / count);
  a.m2 += m2_b + delta * delta * (a.count * count_b / count);
  a.count = count;
}

// Per channel, for C channels sharing the counts.
FASTBB_AVX2_CLONES void merge_into(double* __restrict__ mean, double* __restrict__ m2, double count_a, double count_b,
                                 const double* __restrict__ mean_b, const double* __restrict__ m2_b, int64_t C) {
  const double count = count_a + count_b;
  const double weight_b = count_b / count;
  const double weight_ab = count_a * count_b / count;
  for (int64_t c = 0; c < C; ++c) {
    const double delta = mean_b[c] - mean[c];
    mean[c] += delta * weight_b;
    m2[c] += m2_b[c] + delta * delta * weight_ab;
  }
}

// M2 from sums of deviations can come out a rounding error below 0; NaN (from NaN inputs) is kept.
inline double nonnegative(double m2) {
  return m2 < 0.0 ? 0.0 : m2;
}

// Interleaved partial sums: four AVX2 vectors, enough independent additions to hide their latency.
template <typename acc_t>
constexpr int kLanes = 128 / sizeof(acc_t);

template <typename acc_t>
double lane_total(const acc_t* lanes) {
  double total = 0;
  for (int k = 0; k < kLanes<acc_t>; ++k) total += static_cast<double>(lanes[k]);
  return total;
}

// Mean and M2 of n > 0 contiguous values.
template <typename acc_t>
FASTBB_AVX2_CLONES void piece_moments(const acc_t* __restrict__ x, int64_t n, double* mean, double* m2) {
  constexpr int L = kLanes<acc_t>;
  acc_t sum[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int k = 0; k < L; ++k) sum[k] += x[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) sum[k] += x[i];
  const acc_t pivot = static_cast<acc_t>(lane_total(sum) / static_cast<double>(n));
  acc_t dev[L] = {}, sq[L] = {};
  for (i = 0; i + L <= n; i += L) {
    for (int k = 0; k < L; ++k) {
      const acc_t d = x[i + k] - pivot;
      dev[k] += d;
      sq[k] += d * d;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const acc_t d = x[i] - pivot;
    dev[k] += d;
    sq[k] += d * d;
  }
  const double dev_total = lane_total(dev);
  *mean = static_cast<double>(pivot) + dev_total / static_cast<double>(n);
  *m2 = nonnegative(lane_total(sq) - dev_total * dev_total / static_cast<double>(n));
}

// channels_last. A channel's values are spread over the pixels, so a piece cannot be read twice while it
// is in L1 without a stride of C; instead each segment takes one pivot per channel, the mean of its first
// block, and sums the deviations from it and their squares in one sequential pass (float32 over a piece,
// float64 above). The pivot is within a few std of the segment's mean, so no cancellation arises.

// pivot[c] = mean of channel c over `pixels` > 0 pixels.
template <typename acc_t>
FASTBB_AVX2_CLONES void pixel_means(const acc_t* __restrict__ x, int64_t pixels, int64_t C, acc_t* __restrict__ pivot) {
  std::fill(pivot, pivot + C, acc_t(0));
  for (int64_t p = 0; p < pixels; ++p) {
    const acc_t* __restrict__ row = x + p * C;
    for (int64_t c = 0; c < C; ++c) pivot[c] += row[c];
  }
  const acc_t inv_pixels = acc_t(1) / static_cast<acc_t>(pixels);
  for (int64_t c = 0; c < C; ++c) pivot[c] *= inv_pixels;
}

// Adds x - pivot and (x - pivot)^2 of `pixels` pixels to the float32 sums of each channel.
template <typename acc_t>
FASTBB_AVX2_CLONES void pixel_shifted_sums(const acc_t* __restrict__ x, int64_t pixels, int64_t C,
                                         const acc_t* __restrict__ pivot, acc_t* __restrict__ dev,
                                         acc_t* __restrict__ sq) {
  for (int64_t p = 0; p < pixels; ++p) {
    const acc_t* __restrict__ row = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = row[c] - pivot[c];
      dev[c] += d;
      sq[c] += d * d;
    }
  }
}

// Adds the float32 sums of a piece to the float64 ones and clears them for the next.
template <typename acc_t>
FASTBB_AVX2_CLONES void flush_sums(acc_t* __restrict__ a, acc_t* __restrict__ b, double* __restrict__ sum_a,
                                 double* __restrict__ sum_b, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    sum_a[c] += static_cast<double>(a[c]);
    sum_b[c] += static_cast<double>(b[c]);
    a[c] = acc_t(0);
    b[c] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward

// Per channel: out = (y - mean) * scale + shift (+ residual), then ReLU.
template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> mean, scale, shift;
  explicit ChannelAffine(int64_t C) : mean(C), scale(C), shift(C) {}
};

// Statistics of channel c to the returned mean and invstd, and its affine map.
template <typename acc_t>
void finish_channel(int64_t c, const Moments& moments, double eps, const double* weight, const double* bias,
                    acc_t* mean_out, acc_t* invstd_out, ChannelAffine<acc_t>& affine) {
  // No elements (the Python op never gets here with them): mean 0 and variance 0, not NaN.
  const double variance = moments.count > 0 ? moments.m2 / moments.count : 0.0;
  const double invstd = 1.0 / std::sqrt(variance + eps);
  mean_out[c] = static_cast<acc_t>(moments.mean);
  invstd_out[c] = static_cast<acc_t>(invstd);
  affine.mean[c] = static_cast<acc_t>(moments.mean);
  affine.scale[c] = static_cast<acc_t>(weight ? invstd * weight[c] : invstd);
  affine.shift[c] = static_cast<acc_t>(bias ? bias[c] : 0.0);
}

template <typename acc_t, bool kResidual, bool kRelu>
FASTBB_AVX2_CLONES void normalize_span(const acc_t* __restrict__ x, const acc_t* __restrict__ residual,
                                     acc_t* __restrict__ out, int64_t n, acc_t mean, acc_t scale, acc_t shift) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t v = (x[i] - mean) * scale + shift;
    if constexpr (kResidual) v += residual[i];
    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;
    out[i] = v;
  }
}

template <typename acc_t, bool kResidual, bool kRelu>
FASTBB_AVX2_CLONES void normalize_pixels(const acc_t* __restrict__ x, const acc_t* __restrict__ residual,
                                       acc_t* __restrict__ out, int64_t pixels, int64_t C,
                                       const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift) {
  for (int64_t p = 0; p < pixels; ++p) {
    const int64_t base = p * C;
    for (int64_t c = 0; c < C; ++c) {
      acc_t v = (x[base + c] - mean[c]) * scale[c] + shift[c];
      if constexpr (kResidual) v += residual[base + c];
      if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;
      out[base + c] = v;
    }
  }
}

struct ForwardArgs {
  int64_t N, C, HW;
  const double* weight;  // (C,) or null
  const double* bias;    // (C,) or null
  double eps;
};

// Normalizes n values of one channel (NCHW), in pieces that fit the scratch.
template <typename scalar_t, bool kResidual, bool kRelu>
void normalize_run(const scalar_t* y, const scalar_t* residual, scalar_t* out, int64_t n, int64_t c,
                   const ChannelAffine<acc_type<scalar_t>>& affine, Scratch<scalar_t>& scratch) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t start = 0; start < n; start += kPieceElements) {
    const int64_t len = std::min(kPieceElements, n - start);
    const acc_t* x = as_acc(y + start, scratch.input[0].data(), len);
    const acc_t* r = kResidual ? as_acc(residual + start, scratch.input[1].data(), len) : nullptr;
    acc_t* o = acc_target(out + start, scratch.output[0].data());
    normalize_span<acc_t, kResidual, kRelu>(x, r, o, len, affine.mean[c], affine.scale[c], affine.shift[c]);
    store_from(o, out + start, len);
  }
}

// Moments of n > 0 values of one channel: pieces merged in order.
template <typename scalar_t>
Moments segment_moments(const scalar_t* y, int64_t n, Scratch<scalar_t>& scratch) {
  Moments moments;
  for (int64_t start = 0; start < n; start += kPieceElements) {
    const int64_t len = std::min(kPieceElements, n - start);
    double mean, m2;
    piece_moments(as_acc(y + start, scratch.input[0].data(), len), len, &mean, &m2);
    merge_into(moments, static_cast<double>(len), mean, m2);
  }
  return moments;
}

template <typename scalar_t, bool kResidual, bool kRelu>
void forward_nchw(const scalar_t* y, const scalar_t* residual, scalar_t* out, acc_type<scalar_t>* mean_out,
                  acc_type<scalar_t>* invstd_out, const ForwardArgs& args) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = args.N, C = args.C, HW = args.HW;
  const int64_t segments = (HW + kSegmentElements - 1) / kSegmentElements;
  ChannelAffine<acc_t> affine(C);
  const bool fused = C >= kMinChannelsPerThread * at::get_num_threads();
  if (fused) {
    at::parallel_for(0, C, grain_for(N * HW), [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(kPieceElements);
      for (int64_t c = begin; c < end; ++c) {
        Moments channel;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t s = 0; s < segments; ++s) {
            const int64_t start = (n * C + c) * HW + s * kSegmentElements;
            const Moments segment = segment_moments(y + start, std::min(kSegmentElements, HW - s * kSegmentElements),
                                                    scratch);
            merge_into(channel, segment.count, segment.mean, segment.m2);
          }
        }
        finish_channel(c, channel, args.eps, args.weight, args.bias, mean_out, invstd_out, affine);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t start = (n * C + c) * HW;
          normalize_run<scalar_t, kResidual, kRelu>(y + start, kResidual ? residual + start : nullptr, out + start,
                                                    HW, c, affine, scratch);
        }
      }
    });
    return;
  }
  // Items are (plane, segment) pairs, so that a few large channels still split.
  const int64_t items = N * C * segments;
  std::vector<Moments> segment_stats(items);
  at::parallel_for(0, items, grain_for(kSegmentElements), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(kPieceElements);
    for (int64_t item = begin; item < end; ++item) {
      int64_t start, len;
      segment_span(item, segments, HW, &start, &len);
      segment_stats[item] = segment_moments(y + start, len, scratch);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments channel;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t s = 0; s < segments; ++s) {
        const Moments& segment = segment_stats[(n * C + c) * segments + s];
        merge_into(channel, segment.count, segment.mean, segment.m2);
      }
    }
    finish_channel(c, channel, args.eps, args.weight, args.bias, mean_out, invstd_out, affine);
  }
  at::parallel_for(0, items, grain_for(kSegmentElements), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(kPieceElements);
    for (int64_t item = begin; item < end; ++item) {
      int64_t start, len;
      segment_span(item, segments, HW, &start, &len);
      const int64_t c = (item / segments) % C;
      normalize_run<scalar_t, kResidual, kRelu>(y + start, kResidual ? residual + start : nullptr, out + start, len,
                                                c, affine, scratch);
    }
  });
}

// channels_last blocks, pieces and segments, in pixels; each a multiple of the one before, all depending
// on C only.
struct PixelBlocks {
  int64_t block, piece, segment;
  explicit PixelBlocks(int64_t C) {
    const int64_t channels = std::max<int64_t>(C, 1);
    block = std::clamp<int64_t>(kBlockElements / channels, 1, kMaxPiecePixels);
    piece = block * (kMaxPiecePixels / block);
    segment = piece * std::max<int64_t>(1, 2 * kSegmentElements / (piece * channels));
  }
};

template <typename scalar_t, bool kResidual, bool kRelu>
void forward_channels_last(const scalar_t* y, const scalar_t* residual, scalar_t* out, acc_type<scalar_t>* mean_out,
                           acc_type<scalar_t>* invstd_out, const ForwardArgs& args) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = args.C, pixels = args.N * args.HW;
  const PixelBlocks blocks(C);
  const int64_t segments = (pixels + blocks.segment - 1) / blocks.segment;
  // Per segment and channel: mean, then M2.
  std::vector<double> segment_stats(segments * 2 * C);
  at::parallel_for(0, segments, grain_for(blocks.segment * C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(blocks.block * C);
    std::vector<acc_t> pivot(C), dev(C, acc_t(0)), sq(C, acc_t(0));
    for (int64_t s = begin; s < end; ++s) {
      // The sums first, turned into the moments in place.
      double* sum_dev = segment_stats.data() + s * 2 * C;
      double* sum_sq = sum_dev + C;
      std::fill(sum_dev, sum_dev + 2 * C, 0.0);
      const int64_t first = s * blocks.segment, last = std::min(pixels, first + blocks.segment);
      for (int64_t p = first; p < last; p += blocks.block) {
        const int64_t count = std::min(blocks.block, last - p);
        const acc_t* x = as_acc(y + p * C, scratch.input[0].data(), count * C);
        if (p == first) pixel_means(x, count, C, pivot.data());
        pixel_shifted_sums(x, count, C, pivot.data(), dev.data(), sq.data());
        if ((p + count - first) % blocks.piece == 0 || p + count == last) {
          flush_sums(dev.data(), sq.data(), sum_dev, sum_sq, C);
        }
      }
      const double count = static_cast<double>(last - first);
      for (int64_t c = 0; c < C; ++c) {
        const double dev_total = sum_dev[c];
        sum_dev[c] = static_cast<double>(pivot[c]) + dev_total / count;  // the mean
        sum_sq[c] = nonnegative(sum_sq[c] - dev_total * dev_total / count);  // M2
      }
    }
  });
  std::vector<double> mean(C, 0.0), m2(C, 0.0);
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t first = s * blocks.segment, count = std::min(pixels, first + blocks.segment) - first;
    merge_into(mean.data(), m2.data(), static_cast<double>(first), static_cast<double>(count),
               segment_stats.data() + s * 2 * C, segment_stats.data() + s * 2 * C + C, C);
  }
  ChannelAffine<acc_t> affine(C);
  for (int64_t c = 0; c < C; ++c) {
    finish_channel(c, Moments{static_cast<double>(pixels), mean[c], m2[c]}, args.eps, args.weight, args.bias,
                   mean_out, invstd_out, affine);
  }
  at::parallel_for(0, pixels, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(blocks.block * C);
    for (int64_t p = begin; p < end; p += blocks.block) {
      const int64_t count = std::min(blocks.block, end - p), len = count * C;
      const acc_t* x = as_acc(y + p * C, scratch.input[0].data(), len);
      const acc_t* r = kResidual ? as_acc(residual + p * C, scratch.input[1].data(), len) : nullptr;
      acc_t* o = acc_target(out + p * C, scratch.output[0].data());
      normalize_pixels<acc_t, kResidual, kRelu>(x, r, o, count, C, affine.mean.data(), affine.scale.data(),
                                                affine.shift.data());
      store_from(o, out + p * C, len);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward
//
// g = grad_out, masked by out > 0 under ReLU. Per channel sum_g = sum(g) and sum_gd = sum(g * (y - mean));
// then grad_y = w * invstd * (g - sum_g / M - xhat * sum(g * xhat) / M)
//             = scale * ((g - mean_g) - (y - mean) * slope), scale = w * invstd, mean_g = sum_g / M and
// slope = invstd^2 * sum_gd / M. g - mean_g goes first so that a channel of one element gets exactly 0.

template <typename acc_t, bool kRelu>
inline acc_t masked_grad(acc_t grad, acc_t out) {
  if constexpr (kRelu) {
    return out > acc_t(0) ? grad : acc_t(0);
  } else {
    return grad;
  }
}

// sum(g) and sum(g * (y - mean)) of n values of one channel.
template <typename acc_t, bool kRelu>
FASTBB_AVX2_CLONES void piece_grad_sums(const acc_t* __restrict__ grad, const acc_t* __restrict__ out,
                                      const acc_t* __restrict__ y, int64_t n, acc_t mean, double* sum_g,
                                      double* sum_gd) {
  constexpr int L = kLanes<acc_t>;
  acc_t lanes_g[L] = {}, lanes_gd[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int k = 0; k < L; ++k) {
      const acc_t g = masked_grad<acc_t, kRelu>(grad[i + k], kRelu ? out[i + k] : acc_t(0));
      lanes_g[k] += g;
      lanes_gd[k] += g * (y[i + k] - mean);
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const acc_t g = masked_grad<acc_t, kRelu>(grad[i], kRelu ? out[i] : acc_t(0));
    lanes_g[k] += g;
    lanes_gd[k] += g * (y[i] - mean);
  }
  *sum_g = lane_total(lanes_g);
  *sum_gd = lane_total(lanes_gd);
}

// The same per channel over `pixels` pixels of C channels, added to the float32 sums of each channel.
template <typename acc_t, bool kRelu>
FASTBB_AVX2_CLONES void pixel_grad_sums(const acc_t* __restrict__ grad, const acc_t* __restrict__ out,
                                      const acc_t* __restrict__ y, int64_t pixels, int64_t C,
                                      const acc_t* __restrict__ mean, acc_t* __restrict__ piece_g,
                                      acc_t* __restrict__ piece_gd) {
  for (int64_t p = 0; p < pixels; ++p) {
    const int64_t base = p * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = masked_grad<acc_t, kRelu>(grad[base + c], kRelu ? out[base + c] : acc_t(0));
      piece_g[c] += g;
      piece_gd[c] += g * (y[base + c] - mean[c]);
    }
  }
}

template <typename acc_t>
struct GradCoefficients {
  std::vector<acc_t> mean, mean_g, slope, scale;
  explicit GradCoefficients(int64_t C) : mean(C), mean_g(C), slope(C), scale(C) {}
};

template <typename acc_t>
void finish_grad_channel(int64_t c, double sum_g, double sum_gd, double count, const double* mean,
                         const double* invstd, const double* weight, acc_t* grad_weight, acc_t* grad_bias,
                         GradCoefficients<acc_t>& coefficients) {
  grad_bias[c] = static_cast<acc_t>(sum_g);
  grad_weight[c] = static_cast<acc_t>(sum_gd * invstd[c]);
  const double inv_count = count > 0 ? 1.0 / count : 0.0;
  coefficients.mean[c] = static_cast<acc_t>(mean[c]);
  coefficients.mean_g[c] = static_cast<acc_t>(sum_g * inv_count);
  coefficients.slope[c] = static_cast<acc_t>(invstd[c] * invstd[c] * sum_gd * inv_count);
  coefficients.scale[c] = static_cast<acc_t>((weight ? weight[c] : 1.0) * invstd[c]);
}

template <typename acc_t, bool kRelu, bool kResidualGrad>
FASTBB_AVX2_CLONES void grad_input_span(const acc_t* __restrict__ grad, const acc_t* __restrict__ out,
                                      const acc_t* __restrict__ y, acc_t* __restrict__ grad_y,
                                      acc_t* __restrict__ grad_residual, int64_t n, acc_t mean, acc_t mean_g,
                                      acc_t slope, acc_t scale) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = masked_grad<acc_t, kRelu>(grad[i], kRelu ? out[i] : acc_t(0));
    grad_y[i] = scale * ((g - mean_g) - (y[i] - mean) * slope);
    if constexpr (kResidualGrad) grad_residual[i] = g;
  }
}

template <typename acc_t, bool kRelu, bool kResidualGrad>
FASTBB_AVX2_CLONES void grad_input_pixels(const acc_t* __restrict__ grad, const acc_t* __restrict__ out,
                                        const acc_t* __restrict__ y, acc_t* __restrict__ grad_y,
                                        acc_t* __restrict__ grad_residual, int64_t pixels, int64_t C,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ mean_g,
                                        const acc_t* __restrict__ slope, const acc_t* __restrict__ scale) {
  for (int64_t p = 0; p < pixels; ++p) {
    const int64_t base = p * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = masked_grad<acc_t, kRelu>(grad[base + c], kRelu ? out[base + c] : acc_t(0));
      grad_y[base + c] = scale[c] * ((g - mean_g[c]) - (y[base + c] - mean[c]) * slope[c]);
      if constexpr (kResidualGrad) grad_residual[base + c] = g;
    }
  }
}

template <typename scalar_t>
struct BackwardData {
  const scalar_t* grad;
  const scalar_t* out;  // null without ReLU
  const scalar_t* y;
  scalar_t* grad_y;
  scalar_t* grad_residual;  // null unless asked
};

struct BackwardArgs {
  int64_t N, C, HW;
  const double* mean;
  const double* invstd;
  const double* weight;  // (C,) or null
};

// Adds sum(g) and sum(g * (y - mean)) of n values of channel c, from `start` on, to the sums.
template <typename scalar_t, bool kRelu>
void run_grad_sums(const BackwardData<scalar_t>& data, int64_t start, int64_t n, acc_type<scalar_t> mean,
                   Scratch<scalar_t>& scratch, double* sum_g, double* sum_gd) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t offset = 0; offset < n; offset += kPieceElements) {
    const int64_t len = std::min(kPieceElements, n - offset), at = start + offset;
    const acc_t* g = as_acc(data.grad + at, scratch.input[0].data(), len);
    const acc_t* o = kRelu ? as_acc(data.out + at, scratch.input[1].data(), len) : nullptr;
    const acc_t* x = as_acc(data.y + at, scratch.input[2].data(), len);
    double piece_g, piece_gd;
    piece_grad_sums<acc_t, kRelu>(g, o, x, len, mean, &piece_g, &piece_gd);
    *sum_g += piece_g;
    *sum_gd += piece_gd;
  }
}

template <typename scalar_t, bool kRelu, bool kResidualGrad>
void run_grad_input(const BackwardData<scalar_t>& data, int64_t start, int64_t n, int64_t c,
                    const GradCoefficients<acc_type<scalar_t>>& k, Scratch<scalar_t>& scratch) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t offset = 0; offset < n; offset += kPieceElements) {
    const int64_t len = std::min(kPieceElements, n - offset), at = start + offset;
    const acc_t* g = as_acc(data.grad + at, scratch.input[0].data(), len);
    const acc_t* o = kRelu ? as_acc(data.out + at, scratch.input[1].data(), len) : nullptr;
    const acc_t* x = as_acc(data.y + at, scratch.input[2].data(), len);
    acc_t* gy = acc_target(data.grad_y + at, scratch.output[0].data());
    acc_t* gr = kResidualGrad ? acc_target(data.grad_residual + at, scratch.output[1].data()) : nullptr;
    grad_input_span<acc_t, kRelu, kResidualGrad>(g, o, x, gy, gr, len, k.mean[c], k.mean_g[c], k.slope[c],
                                                  k.scale[c]);
    store_from(gy, data.grad_y + at, len);
    if constexpr (kResidualGrad) store_from(gr, data.grad_residual + at, len);
  }
}

template <typename scalar_t, bool kRelu, bool kResidualGrad>
void backward_nchw(const BackwardData<scalar_t>& data, acc_type<scalar_t>* grad_weight, acc_type<scalar_t>* grad_bias,
                   const BackwardArgs& args) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = args.N, C = args.C, HW = args.HW;
  const int64_t segments = (HW + kSegmentElements - 1) / kSegmentElements;
  const double count = static_cast<double>(N * HW);
  GradCoefficients<acc_t> k(C);
  const bool fused = C >= kMinChannelsPerThread * at::get_num_threads();
  if (fused) {
    at::parallel_for(0, C, grain_for(N * HW), [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(kPieceElements);
      for (int64_t c = begin; c < end; ++c) {
        const acc_t mean = static_cast<acc_t>(args.mean[c]);
        double sum_g = 0, sum_gd = 0;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t s = 0; s < segments; ++s) {
            double segment_g = 0, segment_gd = 0;
            run_grad_sums<scalar_t, kRelu>(data, (n * C + c) * HW + s * kSegmentElements,
                                           std::min(kSegmentElements, HW - s * kSegmentElements), mean, scratch,
                                           &segment_g, &segment_gd);
            sum_g += segment_g;
            sum_gd += segment_gd;
          }
        }
        finish_grad_channel(c, sum_g, sum_gd, count, args.mean, args.invstd, args.weight, grad_weight, grad_bias, k);
        for (int64_t n = 0; n < N; ++n) {
          run_grad_input<scalar_t, kRelu, kResidualGrad>(data, (n * C + c) * HW, HW, c, k, scratch);
        }
      }
    });
    return;
  }
  const int64_t items = N * C * segments;
  std::vector<double> segment_sums(2 * items);
  at::parallel_for(0, items, grain_for(kSegmentElements), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(kPieceElements);
    for (int64_t item = begin; item < end; ++item) {
      int64_t start, len;
      segment_span(item, segments, HW, &start, &len);
      const int64_t c = (item / segments) % C;
      double segment_g = 0, segment_gd = 0;
      run_grad_sums<scalar_t, kRelu>(data, start, len, static_cast<acc_t>(args.mean[c]), scratch, &segment_g,
                                     &segment_gd);
      segment_sums[2 * item] = segment_g;
      segment_sums[2 * item + 1] = segment_gd;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sum_g = 0, sum_gd = 0;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t s = 0; s < segments; ++s) {
        const int64_t item = (n * C + c) * segments + s;
        sum_g += segment_sums[2 * item];
        sum_gd += segment_sums[2 * item + 1];
      }
    }
    finish_grad_channel(c, sum_g, sum_gd, count, args.mean, args.invstd, args.weight, grad_weight, grad_bias, k);
  }
  at::parallel_for(0, items, grain_for(kSegmentElements), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(kPieceElements);
    for (int64_t item = begin; item < end; ++item) {
      int64_t start, len;
      segment_span(item, segments, HW, &start, &len);
      run_grad_input<scalar_t, kRelu, kResidualGrad>(data, start, len, (item / segments) % C, k, scratch);
    }
  });
}

template <typename scalar_t, bool kRelu, bool kResidualGrad>
void backward_channels_last(const BackwardData<scalar_t>& data, acc_type<scalar_t>* grad_weight,
                            acc_type<scalar_t>* grad_bias, const BackwardArgs& args) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = args.C, pixels = args.N * args.HW;
  const PixelBlocks blocks(C);
  const int64_t segments = (pixels + blocks.segment - 1) / blocks.segment;
  std::vector<acc_t> mean(C);
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<acc_t>(args.mean[c]);
  // Per segment and channel: sum(g), then sum(g * (y - mean)).
  std::vector<double> segment_sums(segments * 2 * C, 0.0);
  at::parallel_for(0, segments, grain_for(blocks.segment * C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(blocks.block * C);
    std::vector<acc_t> piece_g(C, acc_t(0)), piece_gd(C, acc_t(0));
    for (int64_t s = begin; s < end; ++s) {
      double* sum_g = segment_sums.data() + s * 2 * C;
      const int64_t first = s * blocks.segment, last = std::min(pixels, first + blocks.segment);
      for (int64_t p = first; p < last; p += blocks.block) {
        const int64_t count = std::min(blocks.block, last - p), len = count * C;
        const acc_t* g = as_acc(data.grad + p * C, scratch.input[0].data(), len);
        const acc_t* o = kRelu ? as_acc(data.out + p * C, scratch.input[1].data(), len) : nullptr;
        const acc_t* x = as_acc(data.y + p * C, scratch.input[2].data(), len);
        pixel_grad_sums<acc_t, kRelu>(g, o, x, count, C, mean.data(), piece_g.data(), piece_gd.data());
        if ((p + count - first) % blocks.piece == 0 || p + count == last) {
          flush_sums(piece_g.data(), piece_gd.data(), sum_g, sum_g + C, C);
        }
      }
    }
  });
  std::vector<double> sum_g(C, 0.0), sum_gd(C, 0.0);
  for (int64_t s = 0; s < segments; ++s) {
    const double* segment = segment_sums.data() + s * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += segment[c];
      sum_gd[c] += segment[C + c];
    }
  }
  GradCoefficients<acc_t> k(C);
  for (int64_t c = 0; c < C; ++c) {
    finish_grad_channel(c, sum_g[c], sum_gd[c], static_cast<double>(pixels), args.mean, args.invstd, args.weight,
                        grad_weight, grad_bias, k);
  }
  at::parallel_for(0, pixels, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(blocks.block * C);
    for (int64_t p = begin; p < end; p += blocks.block) {
      const int64_t count = std::min(blocks.block, end - p), len = count * C, at = p * C;
      const acc_t* g = as_acc(data.grad + at, scratch.input[0].data(), len);
      const acc_t* o = kRelu ? as_acc(data.out + at, scratch.input[1].data(), len) : nullptr;
      const acc_t* x = as_acc(data.y + at, scratch.input[2].data(), len);
      acc_t* gy = acc_target(data.grad_y + at, scratch.output[0].data());
      acc_t* gr = kResidualGrad ? acc_target(data.grad_residual + at, scratch.output[1].data()) : nullptr;
      grad_input_pixels<acc_t, kRelu, kResidualGrad>(g, o, x, gy, gr, count, C, k.mean.data(), k.mean_g.data(),
                                                     k.slope.data(), k.scale.data());
      store_from(gy, data.grad_y + at, len);
      if constexpr (kResidualGrad) store_from(gr, data.grad_residual + at, len);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Entry points

// Whether y is channels_last; contiguous NCHW is preferred when it is dense in both formats (C == 1 or a
// 1x1 image), as in the op's fake functions.
bool is_channels_last(const at::Tensor& y) {
  return !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A (C,) parameter or statistic of any floating dtype as float64 values (empty when absent).
std::vector<double> channel_values(const c10::optional<at::Tensor>& t, int64_t C, const char* op, const char* name) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape (", C, "), got ", t->sizes());
  const at::Tensor values = t->to(at::kDouble).contiguous();
  const double* data = values.const_data_ptr<double>();
  return std::vector<double>(data, data + C);
}

// `t` in y's shape, dtype and memory format (a copy only when it is not already).
at::Tensor like_y(const at::Tensor& t, const at::Tensor& y, at::MemoryFormat format, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == y.sizes(), op, ": ", name, " must have y's shape ", y.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), op, ": ", name, " must have y's dtype ", y.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  return t.contiguous(format);
}

void check_y(const at::Tensor& y, const char* op) {
  TORCH_CHECK(y.dim() == 4, op, ": y must be 4-D (N, C, H, W), got ", y.sizes());
  TORCH_CHECK(y.device().is_cpu(), op, ": y must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), op, ": y must be float16, bfloat16, float32 or float64, got ",
              y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cpu(const at::Tensor& y_in,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   const c10::optional<at::Tensor>& bias,
                                                                   const c10::optional<at::Tensor>& residual_in,
                                                                   double eps, bool relu) {
  constexpr const char* kOp = "fastbb.bn_relu_forward";
  check_y(y_in, kOp);
  TORCH_CHECK(eps >= 0, kOp, ": eps must be non-negative, got ", eps);
  const bool channels_last = is_channels_last(y_in);
  const at::MemoryFormat format = format_of(channels_last);
  const at::Tensor y = y_in.contiguous(format);
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const std::vector<double> weight_values = channel_values(weight, C, kOp, "weight");
  const std::vector<double> bias_values = channel_values(bias, C, kOp, "bias");
  at::Tensor residual;
  if (residual_in.has_value()) residual = like_y(*residual_in, y, format, kOp, "residual");
  at::Tensor out = at::empty_like(y, y.options().memory_format(format));
  at::Tensor mean = at::empty({C}, y.options().dtype(compute_dtype(y.scalar_type())));
  at::Tensor invstd = at::empty({C}, y.options().dtype(compute_dtype(y.scalar_type())));
  if (C == 0) return {out, mean, invstd};
  const ForwardArgs args{N, C, HW, weight.has_value() ? weight_values.data() : nullptr,
                         bias.has_value() ? bias_values.data() : nullptr, eps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), kOp, [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* residual_data = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_data = invstd.mutable_data_ptr<acc_t>();
    auto run = [&](auto has_residual, auto has_relu) {
      constexpr bool kResidual = decltype(has_residual)::value;
      constexpr bool kRelu = decltype(has_relu)::value;
      if (channels_last) {
        forward_channels_last<scalar_t, kResidual, kRelu>(y_data, residual_data, out_data, mean_data, invstd_data,
                                                          args);
      } else {
        forward_nchw<scalar_t, kResidual, kRelu>(y_data, residual_data, out_data, mean_data, invstd_data, args);
      }
    };
    if (residual_data != nullptr) {
      relu ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    } else {
      relu ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
    }
  });
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& y_in, const at::Tensor& mean,
    const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, bool relu, bool residual_grad) {
  constexpr const char* kOp = "fastbb.bn_relu_backward";
  check_y(y_in, kOp);
  const bool channels_last = is_channels_last(y_in);
  const at::MemoryFormat format = format_of(channels_last);
  const at::Tensor y = y_in.contiguous(format);
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const at::Tensor grad_out = like_y(grad_out_in, y, format, kOp, "grad_out");
  // Without ReLU the forward output is not read.
  const at::Tensor out = relu ? like_y(out_in, y, format, kOp, "out") : out_in;
  const std::vector<double> mean_values = channel_values(mean, C, kOp, "mean");
  const std::vector<double> invstd_values = channel_values(invstd, C, kOp, "invstd");
  const std::vector<double> weight_values = channel_values(weight, C, kOp, "weight");
  at::Tensor grad_y = at::empty_like(y, y.options().memory_format(format));
  at::Tensor grad_weight = at::empty({C}, y.options().dtype(compute_dtype(y.scalar_type())));
  at::Tensor grad_bias = at::empty({C}, y.options().dtype(compute_dtype(y.scalar_type())));
  at::Tensor grad_residual = residual_grad ? at::empty_like(grad_out, grad_out.options().memory_format(format))
                                           : at::empty({0}, grad_out.options());
  if (C == 0) return {grad_y, grad_weight, grad_bias, grad_residual};
  const BackwardArgs args{N, C, HW, mean_values.data(), invstd_values.data(),
                          weight.has_value() ? weight_values.data() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), kOp, [&] {
    using acc_t = acc_type<scalar_t>;
    const BackwardData<scalar_t> data{grad_out.const_data_ptr<scalar_t>(),
                                      relu ? out.const_data_ptr<scalar_t>() : nullptr, y.const_data_ptr<scalar_t>(),
                                      grad_y.mutable_data_ptr<scalar_t>(),
                                      residual_grad ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr};
    acc_t* grad_weight_data = grad_weight.mutable_data_ptr<acc_t>();
    acc_t* grad_bias_data = grad_bias.mutable_data_ptr<acc_t>();
    auto run = [&](auto has_relu, auto wants_residual) {
      constexpr bool kRelu = decltype(has_relu)::value;
      constexpr bool kResidualGrad = decltype(wants_residual)::value;
      if (channels_last) {
        backward_channels_last<scalar_t, kRelu, kResidualGrad>(data, grad_weight_data, grad_bias_data, args);
      } else {
        backward_nchw<scalar_t, kRelu, kResidualGrad>(data, grad_weight_data, grad_bias_data, args);
      }
    };
    if (relu) {
      residual_grad ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    } else {
      residual_grad ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
    }
  });
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
}

}  // namespace fastbb
