// CPU kernel of fastbb_C::match_anchors (schema in fastbb/ops/retinanet_loss.py): torchvision's Matcher on
// box_iou(gt, anchors) for every image of a padded batch, without the (G, A) IoU matrix.
//
// Per image, two passes over blocks of anchors (the blocks of all images run in parallel):
//   1. (low-quality rule only) each gt's best IoU over every anchor: per-block maxima, then their maximum;
//   2. each anchor's best gt, its thresholds, and whether its IoU with some gt equals that gt's best.
// The IoU of a (gt, anchor) pair is computed twice rather than stored.
//
// Results must be those of torchvision to the bit:
// - The IoU follows box_iou operation for operation: areas (x2 - x1) * (y2 - y1), the overlap
//   min(x2) - max(x1) clamped at 0 (NaN coordinates give NaN, as torch.maximum / minimum / clamp do),
//   inter = w * h, union = area_gt + area_anchor - inter, inter / union. No multiply-add may be fused: in ISO C++ mode (as torch
//   extensions build) GCC does not contract, and the AVX2 clones leave FMA out.
// - Maxima follow torch.max over a dimension on the CPU: a value replaces the maximum when !(value <= max),
//   and the first NaN is final. So ties keep the first gt, and a NaN IoU (0 / 0, zero-area boxes) is the
//   maximum: its anchor keeps that gt (NaN is below no threshold), and a gt whose best is NaN equals no IoU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace fastbb {
namespace {

constexpr int64_t kBlock = 1024;  // anchors per task: a few IoU rows of it stay in L1
constexpr int64_t kBelowLowThreshold = -1;
constexpr int64_t kBetweenThresholds = -2;

// One set of anchors, a coordinate per array (the IoU loop over anchors vectorizes).
template <typename T>
struct AnchorColumns {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const T* area;
};

// torch.maximum / torch.minimum of two coordinates: NaN if either is NaN (std::max / std::min would return
// one or the other depending on the order).
template <typename T>
inline T max_or_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

template <typename T>
inline T min_or_nan(T a, T b) {
  return (a != a || a < b) ? a : b;
}

// IoU of one gt box with anchors [0, n) of the columns, into iou[0, n).
template <typename T>
FASTBB_AVX2_CLONES void iou_row(const T* __restrict__ gt, T gt_area, const T* __restrict__ x1,
                                const T* __restrict__ y1, const T* __restrict__ x2, const T* __restrict__ y2,
                                const T* __restrict__ area, int64_t n, T* __restrict__ iou) {
  const T gx1 = gt[0], gy1 = gt[1], gx2 = gt[2], gy2 = gt[3];
  for (int64_t i = 0; i < n; ++i) {
    const T w_raw = min_or_nan(gx2, x2[i]) - max_or_nan(gx1, x1[i]);
    const T h_raw = min_or_nan(gy2, y2[i]) - max_or_nan(gy1, y1[i]);
    const T w = w_raw < T(0) ? T(0) : w_raw;
    const T h = h_raw < T(0) ? T(0) : h_raw;
    const T inter = w * h;
    const T uni = gt_area + area[i] - inter;
    iou[i] = inter / uni;
  }
}

// torch.max's update rule: whether `value` replaces the running maximum `best`.
template <typename T>
inline bool replaces(T value, T best) {
  return !std::isnan(best) && !(value <= best);
}

// The maximum of iou[0, n), n > 0, by value: NaN if one is NaN (torch.max's result). Only the value is
// needed, so it is taken over eight interleaved lanes (a loop that vectorizes) rather than in order.
template <typename T>
FASTBB_AVX2_CLONES T max_value(const T* __restrict__ iou, int64_t n) {
  constexpr int kLanes = 8;
  T lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = iou[0];
  int nan_seen = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const T v = iou[i + k];
      lanes[k] = v > lanes[k] ? v : lanes[k];
      nan_seen |= static_cast<int>(v != v);
    }
  }
  T best = lanes[0];
  for (int k = 1; k < kLanes; ++k) best = lanes[k] > best ? lanes[k] : best;
  for (; i < n; ++i) {
    best = iou[i] > best ? iou[i] : best;
    nan_seen |= static_cast<int>(iou[i] != iou[i]);
  }
  return nan_seen ? std::numeric_limits<T>::quiet_NaN() : best;
}

// One more gt g for every anchor of a block: torch.max's update of (best, best_gt), branch-free.
template <typename T, typename index_t>
FASTBB_AVX2_CLONES void update_best(const T* __restrict__ iou, int64_t n, index_t g, T* __restrict__ best,
                                    index_t* __restrict__ best_gt) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = iou[i], b = best[i];
    const bool take = (b == b) && !(v <= b);
    best[i] = take ? v : b;
    best_gt[i] = take ? g : best_gt[i];
  }
}

// Marks the anchors whose IoU equals the gt's best (never where that best is NaN).
template <typename T>
FASTBB_AVX2_CLONES void mark_best_of_gt(const T* __restrict__ iou, int64_t n, T gt_best,
                                        uint8_t* __restrict__ marked) {
  for (int64_t i = 0; i < n; ++i) marked[i] |= static_cast<uint8_t>(iou[i] == gt_best);
}

template <typename T>
inline T box_area(const T* box) {
  return (box[2] - box[0]) * (box[3] - box[1]);
}

template <typename T>
void match_anchors_impl(const at::Tensor& anchors, const at::Tensor& gt_boxes, const at::Tensor& gt_counts,
                        double high_threshold, double low_threshold, bool allow_low_quality, at::Tensor& out) {
  const int64_t num_images = gt_boxes.size(0);
  const int64_t num_gt = gt_boxes.size(1);
  const int64_t num_sets = anchors.size(0);
  const int64_t num_anchors = anchors.size(1);
  const int64_t num_blocks = (num_anchors + kBlock - 1) / kBlock;
  const T* anchor_data = anchors.const_data_ptr<T>();
  const T* gt_data = gt_boxes.const_data_ptr<T>();
  const int64_t* count_data = gt_counts.const_data_ptr<int64_t>();
  int64_t* out_data = out.mutable_data_ptr<int64_t>();
  const T high = static_cast<T>(high_threshold);
  const T low = static_cast<T>(low_threshold);

  std::vector<int64_t> counts(num_images);
  std::vector<T> gt_areas(num_images * num_gt);
  for (int64_t n = 0; n < num_images; ++n) {
    counts[n] = std::min(std::max<int64_t>(count_data[n], 0), num_gt);
    for (int64_t g = 0; g < counts[n]; ++g) gt_areas[n * num_gt + g] = box_area(gt_data + 4 * (n * num_gt + g));
  }

  // Anchors as columns x1, y1, x2, y2, area per set.
  std::vector<T> columns(num_sets * 5 * num_anchors);
  at::parallel_for(0, num_sets * num_anchors, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t set = k / num_anchors, a = k % num_anchors;
      const T* box = anchor_data + 4 * k;
      T* base = columns.data() + set * 5 * num_anchors;
      for (int c = 0; c < 4; ++c) base[c * num_anchors + a] = box[c];
      base[4 * num_anchors + a] = box_area(box);
    }
  });
  auto columns_of = [&](int64_t image) {
    const T* base = columns.data() + (num_sets == 1 ? 0 : image) * 5 * num_anchors;
    return AnchorColumns<T>{base, base + num_anchors, base + 2 * num_anchors, base + 3 * num_anchors,
                            base + 4 * num_anchors};
  };

  // Pass 1: the best IoU of each gt, per block of anchors, then over the blocks (in order: the first NaN).
  std::vector<T> gt_best;
  if (allow_low_quality && num_gt > 0) {
    std::vector<T> block_best(num_images * num_blocks * num_gt);
    at::parallel_for(0, num_images * num_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> iou(kBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t image = task / num_blocks, block = task % num_blocks;
        const int64_t first = block * kBlock, n = std::min(kBlock, num_anchors - first);
        const AnchorColumns<T> a = columns_of(image);
        for (int64_t g = 0; g < counts[image]; ++g) {
          const int64_t row = image * num_gt + g;
          iou_row<T>(gt_data + 4 * row, gt_areas[row], a.x1 + first, a.y1 + first, a.x2 + first, a.y2 + first,
                     a.area + first, n, iou.data());
          block_best[task * num_gt + g] = max_value<T>(iou.data(), n);
        }
      }
    });
    gt_best.resize(num_images * num_gt);
    for (int64_t image = 0; image < num_images; ++image) {
      for (int64_t g = 0; g < counts[image]; ++g) {
        T best = block_best[image * num_blocks * num_gt + g];
        for (int64_t block = 1; block < num_blocks; ++block) {
          const T value = block_best[(image * num_blocks + block) * num_gt + g];
          if (replaces(value, best)) best = value;
        }
        gt_best[image * num_gt + g] = best;
      }
    }
  }

  // Pass 2: each anchor's best gt (the first of ties, the first NaN), thresholds, the low-quality rule.
  at::parallel_for(0, num_images * num_blocks, 1, [&](int64_t begin, int64_t end) {
    // Block-local gt indices as wide as T, so that the update loop vectorizes.
    using index_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
    std::vector<T> iou(kBlock), best(kBlock);
    std::vector<index_t> best_gt(kBlock);
    std::vector<uint8_t> best_of_some_gt(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / num_blocks, block = task % num_blocks;
      const int64_t first = block * kBlock, n = std::min(kBlock, num_anchors - first);
      int64_t* matches = out_data + image * num_anchors + first;
      const int64_t count = counts[image];
      if (count == 0) {
        // An image without boxes: all background, as RetinaNet.compute_loss makes it.
        std::fill(matches, matches + n, kBelowLowThreshold);
        continue;
      }
      const AnchorColumns<T> a = columns_of(image);
      std::fill(best_of_some_gt.begin(), best_of_some_gt.begin() + n, uint8_t(0));
      for (int64_t g = 0; g < count; ++g) {
        const int64_t row = image * num_gt + g;
        T* values = g == 0 ? best.data() : iou.data();
        iou_row<T>(gt_data + 4 * row, gt_areas[row], a.x1 + first, a.y1 + first, a.x2 + first, a.y2 + first,
                   a.area + first, n, values);
        if (g == 0) {
          std::fill(best_gt.begin(), best_gt.begin() + n, index_t(0));
        } else {
          update_best<T, index_t>(iou.data(), n, static_cast<index_t>(g), best.data(), best_gt.data());
        }
        if (allow_low_quality) mark_best_of_gt<T>(values, n, gt_best[row], best_of_some_gt.data());
      }
      for (int64_t i = 0; i < n; ++i) {
        int64_t match = static_cast<int64_t>(best_gt[i]);
        if (!best_of_some_gt[i]) {
          if (best[i] < low) {
            match = kBelowLowThreshold;
          } else if (best[i] < high) {
            match = kBetweenThresholds;
          }
        }
        matches[i] = match;
      }
    }
  });
}

at::Tensor match_anchors_cpu(const at::Tensor& anchors, const at::Tensor& gt_boxes, const at::Tensor& gt_counts,
                             double high_threshold, double low_threshold, bool allow_low_quality_matches) {
  TORCH_CHECK(anchors.dim() == 3 && anchors.size(2) == 4, "fastbb.match_anchors: anchors must be (1 or N, A, 4)");
  TORCH_CHECK(gt_boxes.dim() == 3 && gt_boxes.size(2) == 4, "fastbb.match_anchors: gt_boxes must be (N, G, 4)");
  TORCH_CHECK(anchors.size(0) == 1 || anchors.size(0) == gt_boxes.size(0),
              "fastbb.match_anchors: anchors must be shared (1, A, 4) or per image (N, A, 4)");
  TORCH_CHECK(gt_counts.dim() == 1 && gt_counts.size(0) == gt_boxes.size(0) && gt_counts.scalar_type() == at::kLong,
              "fastbb.match_anchors: gt_counts must be (N,) int64");
  TORCH_CHECK(anchors.scalar_type() == gt_boxes.scalar_type(),
              "fastbb.match_anchors: anchors and gt_boxes must have one dtype");
  const at::Tensor a = anchors.contiguous(), g = gt_boxes.contiguous(), c = gt_counts.contiguous();
  at::Tensor out = at::empty({g.size(0), a.size(1)}, g.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastbb_match_anchors_cpu", [&] {
    match_anchors_impl<scalar_t>(a, g, c, high_threshold, low_threshold, allow_low_quality_matches, out);
  });
  return out;
}

}  // namespace
}  // namespace fastbb

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) { m.impl("match_anchors", &fastbb::match_anchors_cpu); }
