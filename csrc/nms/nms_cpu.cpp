// CPU kernels of the NMS ops (schemas in fastbb/ops/nms.py):
//   fastbb_C::nms(boxes, scores, idxs?, iou_threshold)            -> kept indices in rank order
//   fastbb_C::nms_sorted_padded(boxes, labels, valid_counts, thr) -> keep (B, M) bool
//   fastbb_C::nms_iou_mask(boxes, labels?, valid_counts, thr)     -> suppression bitmask (B, M, W)
//   fastbb_C::nms_reduce_mask(mask, valid_counts)                 -> keep (B, M) bool
//
// The greedy pass tests each candidate only against kept boxes it can overlap. IoU > threshold >= 0
// needs a positive intersection, and a positive intersection needs two boxes with x2 > x1 and y2 > y1
// whose intervals overlap on both axes. Boxes that fail x2 > x1 && y2 > y1 (zero-area, inverted, NaN)
// can therefore neither suppress nor be suppressed: they are always kept, as in torchvision, whose IoU
// is then 0 or NaN. The others go through a uniform grid: kept boxes are listed in the cells they
// cover, a candidate looks at the cells it covers. Cell indices are a monotone function of the
// coordinate (clamped to the grid), so two overlapping intervals always share a cell, infinite
// coordinates included; the pruning never changes a result.

// The IoU must round exactly like torchvision's, so no multiply-add may be fused: with -std=c++17/20 (ISO
// mode, as torch extensions build) GCC does not contract, and clang contracts only within one expression;
// the product `inter` is its own statement.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "nms/nms_threshold.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "nms/nms_cpu.h"

namespace fastbb {
namespace {

bool in_parallel_region() {
#ifdef _OPENMP
  return omp_in_parallel() != 0;
#else
  return true;
#endif
}

// Boxes in rank order, one array per coordinate, in the compute type (float or double).
template <typename T>
struct RankedBoxes {
  std::vector<T> x1, y1, x2, y2, area;
  explicit RankedBoxes(int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n) {}
  void set(int64_t r, T a, T b, T c, T d) {
    x1[r] = a;
    y1[r] = b;
    x2[r] = c;
    y2[r] = d;
    area[r] = (c - a) * (d - b);
  }
};

// torchvision's IoU, operation for operation, > threshold (given as threshold_below<T>).
template <typename T>
inline bool iou_above(T ax1, T ay1, T ax2, T ay2, T aarea, T bx1, T by1, T bx2, T by2, T barea, T threshold) {
  const T w = std::max(static_cast<T>(0), std::min(ax2, bx2) - std::max(ax1, bx1));
  const T h = std::max(static_cast<T>(0), std::min(ay2, by2) - std::max(ay1, by1));
  // No intersection: the IoU is 0 (or NaN), never above a threshold >= 0; skip the division.
  if (!(w > 0 && h > 0)) return false;
  const T inter = w * h;
  return inter / (aarea + barea - inter) > threshold;
}

// A list of boxes in blocks of 8 (one array per coordinate inside a block), so that testing a
// candidate against the list is a branch-free loop the compiler vectorizes.
template <typename T>
class BoxList {
 public:
  void push(T x1, T y1, T x2, T y2, T area) {
    if (size_ % kLanes == 0) blocks_.push_back(empty_block());
    Block& block = blocks_.back();
    const int lane = size_ % kLanes;
    block.x1[lane] = x1;
    block.y1[lane] = y1;
    block.x2[lane] = x2;
    block.y2[lane] = y2;
    block.area[lane] = area;
    ++size_;
  }

  int64_t size() const { return size_; }
  void reserve(int64_t n) { blocks_.reserve((n + kLanes - 1) / kLanes); }

  // Whether a box of the list has IoU > threshold with box b. The conditional expressions are
  // torchvision's std::min/max for the non-NaN boxes that reach here.
  bool any_iou_above(T bx1, T by1, T bx2, T by2, T barea, T threshold) const {
    for (const Block& block : blocks_) {
      int hit = 0;
      for (int k = 0; k < kLanes; ++k) {
        const T right = bx2 < block.x2[k] ? bx2 : block.x2[k], left = block.x1[k] < bx1 ? bx1 : block.x1[k];
        const T bottom = by2 < block.y2[k] ? by2 : block.y2[k], top = block.y1[k] < by1 ? by1 : block.y1[k];
        const T w = right - left > 0 ? right - left : 0;
        const T h = bottom - top > 0 ? bottom - top : 0;
        const T inter = w * h;
        hit |= inter / (block.area[k] + barea - inter) > threshold ? 1 : 0;
      }
      if (hit) return true;
    }
    return false;
  }

 private:
  static constexpr int kLanes = 8;
  struct Block {
    T x1[kLanes], y1[kLanes], x2[kLanes], y2[kLanes], area[kLanes];
  };
  // Unused lanes hold an empty interval (x1 = +inf > x2 = -inf): zero intersection with anything.
  static Block empty_block() {
    Block block;
    const T inf = std::numeric_limits<T>::infinity();
    for (int k = 0; k < kLanes; ++k) {
      block.x1[k] = block.y1[k] = inf;
      block.x2[k] = block.y2[k] = -inf;
      block.area[k] = 0;
    }
    return block;
  }
  std::vector<Block> blocks_;
  int64_t size_ = 0;
};

// Greedy NMS over n boxes already in rank order; keep[r] = 1 for kept boxes, 0 for suppressed ones.
template <typename T>
void greedy_nms(const T* x1, const T* y1, const T* x2, const T* y2, const T* area, int64_t n,
                double iou_threshold, uint8_t* keep) {
  const T threshold = threshold_below<T>(iou_threshold);
  std::vector<int32_t> active;
  active.reserve(n);
  for (int64_t r = 0; r < n; ++r) {
    const bool can_overlap = x2[r] > x1[r] && y2[r] > y1[r];
    keep[r] = can_overlap ? 0 : 1;
    if (can_overlap) active.push_back(static_cast<int32_t>(r));
  }
  const int64_t num_active = static_cast<int64_t>(active.size());
  if (num_active == 0) return;

  // Grid over the finite extent, cells about the mean box size, at most ~2 cells per box.
  double lo_x = std::numeric_limits<double>::infinity(), lo_y = lo_x, hi_x = -lo_x, hi_y = -lo_x;
  double sum_w = 0, sum_h = 0;
  int64_t num_finite = 0;
  for (int32_t r : active) {
    const double a = x1[r], b = y1[r], c = x2[r], d = y2[r];
    if (!(std::isfinite(a) && std::isfinite(b) && std::isfinite(c) && std::isfinite(d))) continue;
    lo_x = std::min(lo_x, a);
    lo_y = std::min(lo_y, b);
    hi_x = std::max(hi_x, c);
    hi_y = std::max(hi_y, d);
    sum_w += c - a;
    sum_h += d - b;
    ++num_finite;
  }
  int64_t nx = 1, ny = 1;
  double scale_x = 0, scale_y = 0;
  constexpr int64_t kGridFrom = 256;  // below this one vectorized scan of the kept boxes is faster
  if (num_finite > 0 && num_active >= kGridFrom) {
    const double extent_x = hi_x - lo_x, extent_y = hi_y - lo_y;
    const double cell_w = sum_w / num_finite, cell_h = sum_h / num_finite;
    const double max_cells = 2.0 * num_active + 16;
    double fx = (std::isfinite(extent_x / cell_w) && cell_w > 0) ? std::ceil(extent_x / cell_w) : 1;
    double fy = (std::isfinite(extent_y / cell_h) && cell_h > 0) ? std::ceil(extent_y / cell_h) : 1;
    fx = std::min(std::max(fx, 1.0), max_cells);
    fy = std::min(std::max(fy, 1.0), max_cells);
    if (fx * fy > max_cells) {
      const double shrink = std::sqrt(fx * fy / max_cells);
      fx = std::max(1.0, std::floor(fx / shrink));
      fy = std::max(1.0, std::floor(fy / shrink));
    }
    nx = static_cast<int64_t>(fx);
    ny = static_cast<int64_t>(fy);
    scale_x = extent_x > 0 && std::isfinite(nx / extent_x) ? nx / extent_x : 0;
    scale_y = extent_y > 0 && std::isfinite(ny / extent_y) ? ny / extent_y : 0;
    if (scale_x == 0) nx = 1;
    if (scale_y == 0) ny = 1;
  }
  const auto cell_of = [](T v, double lo, double scale, int64_t cells) -> int64_t {
    if (scale == 0) return 0;
    const double c = std::floor((static_cast<double>(v) - lo) * scale);
    return c <= 0 ? 0 : (c >= static_cast<double>(cells - 1) ? cells - 1 : static_cast<int64_t>(c));
  };

  // Kept boxes are listed in every cell they cover; a box covering many cells goes to `wide`
  // instead, checked against every candidate. A box listed in several cells may be tested more than
  // once: cheaper than remembering which were tested.
  constexpr int64_t kMaxCellsPerBox = 16;
  BoxList<T> all_kept;
  all_kept.reserve(num_active);
  if (nx * ny == 1) {
    for (int32_t r : active) {
      if (all_kept.any_iou_above(x1[r], y1[r], x2[r], y2[r], area[r], threshold)) continue;
      keep[r] = 1;
      all_kept.push(x1[r], y1[r], x2[r], y2[r], area[r]);
    }
    return;
  }
  std::vector<BoxList<T>> cells(nx * ny);
  BoxList<T> wide;
  for (int32_t r : active) {
    const T bx1 = x1[r], by1 = y1[r], bx2 = x2[r], by2 = y2[r], barea = area[r];
    const int64_t cx0 = cell_of(bx1, lo_x, scale_x, nx), cx1 = cell_of(bx2, lo_x, scale_x, nx);
    const int64_t cy0 = cell_of(by1, lo_y, scale_y, ny), cy1 = cell_of(by2, lo_y, scale_y, ny);
    const int64_t num_cells = (cx1 - cx0 + 1) * (cy1 - cy0 + 1);
    bool suppressed = wide.any_iou_above(bx1, by1, bx2, by2, barea, threshold);
    if (!suppressed && num_cells > all_kept.size() / 4) {
      suppressed = all_kept.any_iou_above(bx1, by1, bx2, by2, barea, threshold);
    } else {
      for (int64_t cy = cy0; cy <= cy1 && !suppressed; ++cy) {
        for (int64_t cx = cx0; cx <= cx1 && !suppressed; ++cx) {
          suppressed = cells[cy * nx + cx].any_iou_above(bx1, by1, bx2, by2, barea, threshold);
        }
      }
    }
    if (suppressed) continue;

    keep[r] = 1;
    all_kept.push(bx1, by1, bx2, by2, barea);
    if (num_cells > kMaxCellsPerBox) {
      wide.push(bx1, by1, bx2, by2, barea);
      continue;
    }
    for (int64_t cy = cy0; cy <= cy1; ++cy) {
      for (int64_t cx = cx0; cx <= cx1; ++cx) cells[cy * nx + cx].push(bx1, by1, bx2, by2, barea);
    }
  }
}

// Greedy NMS of boxes in rank order, separately per label when labels (rank order) are given.
template <typename T>
void nms_ranked(const RankedBoxes<T>& boxes, const int64_t* labels, int64_t n, double threshold,
                uint8_t* keep, bool may_parallelize) {
  if (n == 0) return;
  if (labels == nullptr) {
    greedy_nms<T>(boxes.x1.data(), boxes.y1.data(), boxes.x2.data(), boxes.y2.data(), boxes.area.data(),
                  n, threshold, keep);
    return;
  }
  // Ranks grouped by label, rank order kept within a group (the grouping is stable).
  std::vector<int64_t> grouped(n);
  std::vector<int64_t> group_start;
  const auto [lo_it, hi_it] = std::minmax_element(labels, labels + n);
  const int64_t lo = *lo_it;
  const uint64_t range = static_cast<uint64_t>(*hi_it) - static_cast<uint64_t>(lo);
  if (range <= static_cast<uint64_t>(2 * n + 1024)) {
    std::vector<int64_t> offset(range + 2, 0);
    for (int64_t r = 0; r < n; ++r) ++offset[static_cast<uint64_t>(labels[r] - lo) + 1];
    for (uint64_t c = 0; c <= range; ++c) {
      if (offset[c + 1] > 0) group_start.push_back(offset[c]);
      offset[c + 1] += offset[c];
    }
    for (int64_t r = 0; r < n; ++r) grouped[offset[static_cast<uint64_t>(labels[r] - lo)]++] = r;
  } else {
    std::vector<std::pair<int64_t, int64_t>> pairs(n);
    for (int64_t r = 0; r < n; ++r) pairs[r] = {labels[r], r};
    std::sort(pairs.begin(), pairs.end());
    for (int64_t r = 0; r < n; ++r) {
      grouped[r] = pairs[r].second;
      if (r == 0 || pairs[r].first != pairs[r - 1].first) group_start.push_back(r);
    }
  }
  group_start.push_back(n);
  const int64_t num_groups = static_cast<int64_t>(group_start.size()) - 1;
  if (num_groups == 1) {
    nms_ranked<T>(boxes, nullptr, n, threshold, keep, may_parallelize);
    return;
  }
  // Below ~16k boxes the whole pass takes about a millisecond: waking threads would cost more.
  const bool parallel = may_parallelize && n >= 16384 && !in_parallel_region();
#pragma omp parallel for schedule(dynamic, 1) if (parallel) num_threads(at::get_num_threads())
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t begin = group_start[g], size = group_start[g + 1] - begin;
    RankedBoxes<T> group(size);
    for (int64_t i = 0; i < size; ++i) {
      const int64_t r = grouped[begin + i];
      group.x1[i] = boxes.x1[r];
      group.y1[i] = boxes.y1[r];
      group.x2[i] = boxes.x2[r];
      group.y2[i] = boxes.y2[r];
      group.area[i] = boxes.area[r];
    }
    std::vector<uint8_t> group_keep(size);
    greedy_nms<T>(group.x1.data(), group.y1.data(), group.x2.data(), group.y2.data(), group.area.data(),
                  size, threshold, group_keep.data());
    for (int64_t i = 0; i < size; ++i) keep[grouped[begin + i]] = group_keep[i];
  }
}

// Sort keys in ascending order = scores descending, NaN first; -0.0 and 0.0 are equal.
inline uint32_t descending_key(float s) {
  if (std::isnan(s)) return 0;
  if (s == 0) s = 0;
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

inline uint64_t descending_key(double s) {
  if (std::isnan(s)) return 0;
  if (s == 0) s = 0;
  uint64_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint64_t ascending = (bits & (1ull << 63)) ? ~bits : (bits | (1ull << 63));
  return ~ascending;
}

// Indices ordered as torch.sort(scores, descending=True, stable=True) orders them.
std::vector<int64_t> rank_by_score(const at::Tensor& scores) {
  const int64_t n = scores.numel();
  std::vector<int64_t> order(n);
  if (scores.scalar_type() != at::kDouble && n < (int64_t{1} << 32)) {
    // Every non-double floating score is exact in float: one 64-bit key (score, index) per box.
    const at::Tensor s = scores.to(at::kFloat).contiguous();
    const float* data = s.const_data_ptr<float>();
    std::vector<uint64_t> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = (uint64_t{descending_key(data[i])} << 32) | uint64_t(i);
    std::sort(keys.begin(), keys.end());
    for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int64_t>(keys[i] & 0xffffffffu);
  } else {
    const at::Tensor s = scores.to(at::kDouble).contiguous();
    const double* data = s.const_data_ptr<double>();
    std::vector<std::pair<uint64_t, int64_t>> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = {descending_key(data[i]), i};
    std::sort(keys.begin(), keys.end());
    for (int64_t i = 0; i < n; ++i) order[i] = keys[i].second;
  }
  return order;
}

void check_threshold(double iou_threshold) {
  TORCH_CHECK(iou_threshold >= 0.0 && iou_threshold <= 1.0,
              "fastbb.nms: iou_threshold must be in [0, 1], got ", iou_threshold);
}

template <typename scalar_t>
at::Tensor nms_cpu_typed(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                         double threshold) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = boxes.size(0);
  const std::vector<int64_t> order = rank_by_score(scores);
  const scalar_t* b = boxes.const_data_ptr<scalar_t>();
  RankedBoxes<T> ranked(n);
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* box = b + 4 * order[r];
    ranked.set(r, static_cast<T>(box[0]), static_cast<T>(box[1]), static_cast<T>(box[2]),
               static_cast<T>(box[3]));
  }
  std::vector<int64_t> ranked_labels;
  if (idxs != nullptr) {
    const int64_t* labels = idxs->const_data_ptr<int64_t>();
    ranked_labels.resize(n);
    for (int64_t r = 0; r < n; ++r) ranked_labels[r] = labels[order[r]];
  }
  std::vector<uint8_t> keep(n);
  nms_ranked<T>(ranked, idxs != nullptr ? ranked_labels.data() : nullptr, n, threshold, keep.data(), true);
  int64_t num_kept = 0;
  for (int64_t r = 0; r < n; ++r) num_kept += keep[r];
  at::Tensor out = at::empty({num_kept}, boxes.options().dtype(at::kLong));
  int64_t* out_data = out.mutable_data_ptr<int64_t>();
  for (int64_t r = 0, k = 0; r < n; ++r) {
    if (keep[r]) out_data[k++] = order[r];
  }
  return out;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const c10::optional<at::Tensor>& idxs,
                   double iou_threshold) {
  return nms_cpu_kernel(boxes, scores, idxs, iou_threshold);
}

// Boxes (B, M, 4) -> compute-type contiguous copy (or the input itself) and its per-image valid counts.
std::vector<int64_t> clamped_counts(const at::Tensor& valid_counts, int64_t batch, int64_t rows) {
  TORCH_CHECK(valid_counts.dim() == 1 && valid_counts.size(0) == batch,
              "fastbb.nms: valid_counts must have shape (B,) = (", batch, ",), got ", valid_counts.sizes());
  const at::Tensor vc = valid_counts.to(at::kLong).contiguous();
  const int64_t* data = vc.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(batch);
  for (int64_t b = 0; b < batch; ++b) counts[b] = std::min(std::max<int64_t>(data[b], 0), rows);
  return counts;
}

void check_padded(const at::Tensor& boxes, const c10::optional<at::Tensor>& labels) {
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(2) == 4, "fastbb.nms: boxes must have shape (B, M, 4), got ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "fastbb.nms: boxes must be floating point");
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 2 && labels->size(0) == boxes.size(0) && labels->size(1) == boxes.size(1),
                "fastbb.nms: labels must have shape (B, M), got ", labels->sizes());
    TORCH_CHECK(labels->scalar_type() == at::kLong, "fastbb.nms: labels must be int64");
  }
}

template <typename scalar_t>
void sorted_padded_typed(const at::Tensor& boxes, const at::Tensor& labels, const std::vector<int64_t>& counts,
                         double threshold, bool* keep) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t batch = boxes.size(0), rows = boxes.size(1);
  const scalar_t* b = boxes.const_data_ptr<scalar_t>();
  const int64_t* l = labels.const_data_ptr<int64_t>();
  const bool parallel = batch > 1 && !in_parallel_region();
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t image = 0; image < batch; ++image) {
    const int64_t n = counts[image];
    RankedBoxes<T> ranked(n);
    const scalar_t* ib = b + image * rows * 4;
    for (int64_t r = 0; r < n; ++r) {
      ranked.set(r, static_cast<T>(ib[4 * r]), static_cast<T>(ib[4 * r + 1]), static_cast<T>(ib[4 * r + 2]),
                 static_cast<T>(ib[4 * r + 3]));
    }
    std::vector<uint8_t> image_keep(n);
    nms_ranked<T>(ranked, l + image * rows, n, threshold, image_keep.data(), batch == 1);
    for (int64_t r = 0; r < n; ++r) keep[image * rows + r] = image_keep[r] != 0;
  }
}

template <typename T>
void iou_mask_typed(const at::Tensor& boxes, const int64_t* l, const std::vector<int64_t>& counts,
                    double iou_threshold, uint64_t* mask) {
  const int64_t batch = boxes.size(0), rows = boxes.size(1), words = (rows + 63) / 64;
  const T* b = boxes.const_data_ptr<T>();
  const T threshold = threshold_below<T>(iou_threshold);
  const bool parallel = batch * rows >= 256 && !in_parallel_region();
#pragma omp parallel for schedule(dynamic, 16) if (parallel)
  for (int64_t row = 0; row < batch * rows; ++row) {
    const int64_t image = row / rows, i = row % rows, n = counts[image];
    if (i >= n) continue;
    const T* bi = b + row * 4;
    const T* base = b + image * rows * 4;
    const T area_i = (bi[2] - bi[0]) * (bi[3] - bi[1]);
    uint64_t* out = mask + row * words;
    for (int64_t j = i + 1; j < n; ++j) {
      if (l != nullptr && l[image * rows + j] != l[row]) continue;
      const T* bj = base + j * 4;
      const T area_j = (bj[2] - bj[0]) * (bj[3] - bj[1]);
      if (iou_above<T>(bi[0], bi[1], bi[2], bi[3], area_i, bj[0], bj[1], bj[2], bj[3], area_j, threshold)) {
        out[j / 64] |= uint64_t{1} << (j % 64);
      }
    }
  }
}

at::Tensor nms_sorted_padded_cpu(const at::Tensor& boxes, const at::Tensor& labels,
                                 const at::Tensor& valid_counts, double iou_threshold) {
  check_padded(boxes, labels);
  check_threshold(iou_threshold);
  const int64_t batch = boxes.size(0), rows = boxes.size(1);
  const std::vector<int64_t> counts = clamped_counts(valid_counts, batch, rows);
  at::Tensor keep = at::zeros({batch, rows}, boxes.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  const at::Tensor box_data = boxes.contiguous();
  const at::Tensor label_data = labels.contiguous();
  bool* keep_data = keep.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_sorted_padded_cpu", [&] {
    sorted_padded_typed<scalar_t>(box_data, label_data, counts, iou_threshold, keep_data);
  });
  return keep;
}

at::Tensor nms_iou_mask_cpu(const at::Tensor& boxes, const c10::optional<at::Tensor>& labels,
                            const at::Tensor& valid_counts, double iou_threshold) {
  check_padded(boxes, labels);
  check_threshold(iou_threshold);
  const int64_t batch = boxes.size(0), rows = boxes.size(1), words = (rows + 63) / 64;
  const std::vector<int64_t> counts = clamped_counts(valid_counts, batch, rows);
  at::Tensor mask = at::zeros({batch, rows, words}, boxes.options().dtype(at::kLong));
  if (mask.numel() == 0) return mask;
  const bool double_boxes = boxes.scalar_type() == at::kDouble;
  const at::Tensor box_data = boxes.to(double_boxes ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor label_data = labels.has_value() ? labels->contiguous() : at::Tensor();
  uint64_t* mask_data = reinterpret_cast<uint64_t*>(mask.mutable_data_ptr<int64_t>());
  const int64_t* l = labels.has_value() ? label_data.const_data_ptr<int64_t>() : nullptr;
  if (double_boxes) {
    iou_mask_typed<double>(box_data, l, counts, iou_threshold, mask_data);
  } else {
    iou_mask_typed<float>(box_data, l, counts, iou_threshold, mask_data);
  }
  return mask;
}

at::Tensor nms_reduce_mask_cpu(const at::Tensor& mask, const at::Tensor& valid_counts) {
  TORCH_CHECK(mask.dim() == 3 && mask.scalar_type() == at::kLong && mask.size(2) == (mask.size(1) + 63) / 64,
              "fastbb.nms: mask must be int64 of shape (B, M, ceil(M / 64)), got ", mask.sizes());
  const int64_t batch = mask.size(0), rows = mask.size(1), words = mask.size(2);
  const std::vector<int64_t> counts = clamped_counts(valid_counts, batch, rows);
  at::Tensor keep = at::zeros({batch, rows}, mask.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  const at::Tensor mask_data = mask.contiguous();
  const uint64_t* m = reinterpret_cast<const uint64_t*>(mask_data.const_data_ptr<int64_t>());
  bool* keep_data = keep.mutable_data_ptr<bool>();
  const bool parallel = batch > 1 && !in_parallel_region();
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t image = 0; image < batch; ++image) {
    std::vector<uint64_t> removed(words, 0);
    for (int64_t i = 0; i < counts[image]; ++i) {
      if ((removed[i / 64] >> (i % 64)) & 1) continue;
      keep_data[image * rows + i] = true;
      const uint64_t* row = m + (image * rows + i) * words;
      for (int64_t w = i / 64; w < words; ++w) removed[w] |= row[w];
    }
  }
  return keep;
}

}  // namespace

at::Tensor nms_cpu_kernel(const at::Tensor& boxes, const at::Tensor& scores,
                          const c10::optional<at::Tensor>& idxs, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "fastbb.nms: boxes must have shape (N, 4), got ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "fastbb.nms: boxes must be floating point, got ",
              boxes.scalar_type());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "fastbb.nms: scores must have shape (N,) = (", boxes.size(0), ",), got ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "fastbb.nms: scores must be floating point");
  TORCH_CHECK(!boxes.is_cuda() && !scores.is_cuda(), "fastbb.nms: nms_cpu_kernel takes CPU tensors");
  check_threshold(iou_threshold);
  at::Tensor labels;
  if (idxs.has_value()) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == boxes.size(0), "fastbb.nms: idxs must have shape (N,) = (",
                boxes.size(0), ",), got ", idxs->sizes());
    TORCH_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false),
                "fastbb.nms: idxs must be an integer tensor");
    labels = idxs->to(at::kLong).contiguous();
  }
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor box_data = boxes.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cpu", [&] {
    out = nms_cpu_typed<scalar_t>(box_data, scores, idxs.has_value() ? &labels : nullptr, iou_threshold);
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("nms_sorted_padded", &nms_sorted_padded_cpu);
  m.impl("nms_iou_mask", &nms_iou_mask_cpu);
  m.impl("nms_reduce_mask", &nms_reduce_mask_cpu);
}

}  // namespace fastbb
