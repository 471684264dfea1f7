// CPU kernel of fastbb_C::retinanet_postprocess (schema and semantics in fastbb/ops/retinanet_postprocess.py):
// torchvision RetinaNet's postprocess_detections for a batch, with a padded result.
//
// Per (image, level): one pass over the logits. A logit below logit(score_thresh) minus a guard band is
// rejected without its sigmoid; the others get the sigmoid torch computes and the comparison torch makes
// (in the logits' dtype). The top-k candidates (score descending, ties by lower index) come from a
// partial selection. Per image: decode + clip of the selected boxes, NMS per label, the first D kept.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "box_decode/box_decode.h"
#include "nms/nms_cpu.h"

namespace fastbb {
namespace {

template <typename score_t>
struct Candidate {
  score_t score;
  int64_t index;  // flattened (anchor * K + class) within the level
};

// The rank order: higher score first, ties by lower index.
template <typename score_t>
inline bool ranks_before(const Candidate<score_t>& a, const Candidate<score_t>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// The sigmoid as torch's CPU kernel computes it for scalar_t (reduced types in float, then rounded), as
// the score type (float, or double for double logits).
template <typename scalar_t, typename score_t>
inline score_t torch_sigmoid(scalar_t x) {
  const score_t v = static_cast<score_t>(x);
  const score_t s = score_t(1) / (score_t(1) + std::exp(-v));
  return static_cast<score_t>(static_cast<scalar_t>(s));
}

// Logits below this bound have sigmoid(x) <= threshold in scalar_t for sure; -inf when no bound is safe.
// `threshold` is score_thresh rounded to the logits' dtype (what torch compares with). Below the bound,
// the true sigmoid is at least 5% (relative) under the threshold, far beyond the rounding of the
// computed sigmoid (bfloat16: 0.4%) and of exp; tiny thresholds get no bound (subnormal scores).
inline double reject_bound(double threshold) {
  if (!(threshold >= 1e-4) || !(threshold < 1.0)) return -std::numeric_limits<double>::infinity();
  const double logit = std::log(threshold) - std::log1p(-threshold);
  return logit - 0.05 / (1.0 - threshold);
}

constexpr int64_t kChunk = 16;

// Keeps the k best of `out` (in no particular order) and returns the score of the worst of them.
template <typename score_t>
score_t keep_best(std::vector<Candidate<score_t>>& out, int64_t k) {
  std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), ranks_before<score_t>);
  const score_t worst = out[k - 1].score;
  out.resize(k);
  return worst;
}

// Candidates of one (image, level): scores > threshold, then the top k in rank order.
template <typename scalar_t, typename score_t>
void select_level(const scalar_t* logits, int64_t count, score_t threshold, int64_t k,
                  std::vector<Candidate<score_t>>& out) {
  out.clear();
  // Whenever the buffer fills, it is cut to the k best and the threshold rises to the worst of them: a
  // later logit (higher index) must then score strictly above it to enter, and the reject bound follows,
  // so most of a large level is skipped by the chunk test alone.
  const int64_t capacity = std::max<int64_t>(2 * k, 1024);
  out.reserve(std::min<int64_t>(capacity, count));
  float lo = static_cast<float>(reject_bound(static_cast<double>(threshold)));  // -inf: check every logit
  auto consider = [&](int64_t j) {
    const scalar_t x = logits[j];
    if (static_cast<float>(x) < lo) return;
    const score_t s = torch_sigmoid<scalar_t, score_t>(x);
    if (s > threshold) out.push_back({s, j});
  };
  int64_t j = 0;
  while (j < count && threshold < score_t(1)) {  // a sigmoid is never above 1
    const int64_t stop = std::min(count, j + 64 * kChunk);
    // Most logits are far below the threshold: a branch-free test of a whole chunk skips them together.
    for (; j + kChunk <= stop; j += kChunk) {
      int any = 0;
      for (int64_t i = 0; i < kChunk; ++i) any |= static_cast<float>(logits[j + i]) >= lo;
      if (!any) continue;
      for (int64_t i = 0; i < kChunk; ++i) consider(j + i);
    }
    for (; j < stop; ++j) consider(j);
    if (static_cast<int64_t>(out.size()) >= capacity) {
      threshold = keep_best(out, k);
      lo = static_cast<float>(reject_bound(static_cast<double>(threshold)));
    }
  }
  // NaN logits fail both tests above (no NaN score is ever a candidate), as sigmoid(NaN) > t is false.
  if (static_cast<int64_t>(out.size()) > k) keep_best(out, k);
  std::sort(out.begin(), out.end(), ranks_before<score_t>);
}

struct Options {
  int64_t num_classes;
  std::vector<int64_t> level_start;  // in anchors
  std::vector<int64_t> level_count;
  double score_thresh, nms_thresh;
  int64_t detections_per_img, topk_candidates;
  BoxDecodeParams decode;
};

template <typename scalar_t>
void postprocess(const at::Tensor& logits, const at::Tensor& regression, const std::vector<at::Tensor>& anchors,
                 const int64_t* image_sizes, const Options& o, at::Tensor& out_boxes, at::Tensor& out_scores,
                 at::Tensor& out_labels, at::Tensor& out_counts) {
  using score_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t num_images = logits.size(0), num_anchors = logits.size(1), K = o.num_classes;
  const int64_t num_levels = static_cast<int64_t>(o.level_count.size());
  const int64_t D = o.detections_per_img;
  const score_t threshold = static_cast<score_t>(static_cast<scalar_t>(o.score_thresh));
  const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
  const scalar_t* regression_data = regression.const_data_ptr<scalar_t>();

  // (image, level) tasks, largest levels first so that dynamic scheduling balances them.
  std::vector<int64_t> tasks(num_images * num_levels);
  std::iota(tasks.begin(), tasks.end(), 0);
  std::stable_sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t b) {
    return o.level_count[a % num_levels] > o.level_count[b % num_levels];
  });
  std::vector<std::vector<Candidate<score_t>>> selected(num_images * num_levels);
  std::exception_ptr error;

#pragma omp parallel for schedule(dynamic, 1) if (tasks.size() > 1)
  for (int64_t t = 0; t < static_cast<int64_t>(tasks.size()); ++t) {
    const int64_t task = tasks[t], image = task / num_levels, level = task % num_levels;
    try {
      const scalar_t* level_logits = logit_data + (image * num_anchors + o.level_start[level]) * K;
      select_level<scalar_t, score_t>(level_logits, o.level_count[level] * K, threshold,
                                      o.topk_candidates, selected[task]);
    } catch (...) {
#pragma omp critical
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);

  scalar_t* box_out = out_boxes.mutable_data_ptr<scalar_t>();
  scalar_t* score_out = out_scores.mutable_data_ptr<scalar_t>();
  int64_t* label_out = out_labels.mutable_data_ptr<int64_t>();
  int64_t* count_out = out_counts.mutable_data_ptr<int64_t>();
  using acc_t = score_t;

#pragma omp parallel for schedule(dynamic, 1) if (num_images > 1)
  for (int64_t image = 0; image < num_images; ++image) {
    try {
      int64_t total = 0;
      for (int64_t level = 0; level < num_levels; ++level) total += selected[image * num_levels + level].size();
      const auto options = logits.options();
      at::Tensor boxes = at::empty({total, 4}, options);
      at::Tensor scores = at::empty({total}, options);
      at::Tensor labels = at::empty({total}, options.dtype(at::kLong));
      scalar_t* b = boxes.mutable_data_ptr<scalar_t>();
      scalar_t* s = scores.mutable_data_ptr<scalar_t>();
      int64_t* l = labels.mutable_data_ptr<int64_t>();
      BoxDecodeParams p = o.decode;
      p.clip = true;
      p.clip_h = static_cast<double>(image_sizes[2 * image]);
      p.clip_w = static_cast<double>(image_sizes[2 * image + 1]);
      const scalar_t* anchor_data = anchors[image].const_data_ptr<scalar_t>();
      const scalar_t* image_regression = regression_data + image * num_anchors * 4;
      // Levels in order, each in rank order: NMS ranks equal scores by lower (level, index) first.
      int64_t row = 0;
      for (int64_t level = 0; level < num_levels; ++level) {
        for (const auto& c : selected[image * num_levels + level]) {
          const int64_t anchor = o.level_start[level] + c.index / K;
          acc_t decoded[4];
          decode_box<acc_t>(anchor_data + 4 * anchor, image_regression + 4 * anchor, p, decoded);
          for (int i = 0; i < 4; ++i) b[4 * row + i] = static_cast<scalar_t>(decoded[i]);
          s[row] = static_cast<scalar_t>(c.score);
          l[row] = c.index % K;
          ++row;
        }
      }
      const at::Tensor keep = nms_cpu_kernel(boxes, scores, labels, o.nms_thresh);
      const int64_t kept = std::min<int64_t>(keep.size(0), D);
      const int64_t* k = keep.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < kept; ++i) {
        const int64_t r = k[i], dst = image * D + i;
        for (int c = 0; c < 4; ++c) box_out[4 * dst + c] = b[4 * r + c];
        score_out[dst] = s[r];
        label_out[dst] = l[r];
      }
      count_out[image] = kept;
    } catch (...) {
#pragma omp critical
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> retinanet_postprocess_cpu(
    const at::Tensor& cls_logits, const at::Tensor& bbox_regression, at::TensorList anchors,
    at::IntArrayRef num_anchors_per_level, const at::Tensor& image_sizes, double score_thresh, double nms_thresh,
    int64_t detections_per_img, int64_t topk_candidates, at::ArrayRef<double> box_coder_weights) {
  TORCH_CHECK(cls_logits.dim() == 3, "fastbb.retinanet_postprocess: cls_logits must be (N, A, K), got ", cls_logits.sizes());
  const int64_t num_images = cls_logits.size(0), num_anchors = cls_logits.size(1);
  TORCH_CHECK(bbox_regression.dim() == 3 && bbox_regression.size(0) == num_images &&
                  bbox_regression.size(1) == num_anchors && bbox_regression.size(2) == 4,
              "fastbb.retinanet_postprocess: bbox_regression must be (N, A, 4) = (", num_images, ", ", num_anchors,
              ", 4), got ", bbox_regression.sizes());
  TORCH_CHECK(at::isFloatingType(cls_logits.scalar_type()) && bbox_regression.scalar_type() == cls_logits.scalar_type(),
              "fastbb.retinanet_postprocess: cls_logits and bbox_regression must share one floating dtype, got ",
              cls_logits.scalar_type(), " and ", bbox_regression.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(anchors.size()) == num_images, "fastbb.retinanet_postprocess: expected ", num_images,
              " anchor tensors, got ", anchors.size());
  std::vector<at::Tensor> anchor_data;
  for (const auto& a : anchors) {
    TORCH_CHECK(a.dim() == 2 && a.size(0) == num_anchors && a.size(1) == 4,
                "fastbb.retinanet_postprocess: anchors must be (A, 4) = (", num_anchors, ", 4), got ", a.sizes());
    TORCH_CHECK(a.device().is_cpu(), "fastbb.retinanet_postprocess: anchors must be CPU tensors");
    anchor_data.push_back(a.to(cls_logits.scalar_type()).contiguous());
  }
  TORCH_CHECK(image_sizes.dim() == 2 && image_sizes.size(0) == num_images && image_sizes.size(1) == 2,
              "fastbb.retinanet_postprocess: image_sizes must be (N, 2) = (", num_images, ", 2), got ", image_sizes.sizes());
  TORCH_CHECK(cls_logits.device().is_cpu() && bbox_regression.device().is_cpu() && image_sizes.device().is_cpu(),
              "fastbb.retinanet_postprocess: the CPU kernel takes CPU tensors");
  TORCH_CHECK(score_thresh >= 0.0 && score_thresh <= 1.0, "fastbb.retinanet_postprocess: score_thresh must be in [0, 1], got ",
              score_thresh);
  TORCH_CHECK(nms_thresh >= 0.0 && nms_thresh <= 1.0, "fastbb.retinanet_postprocess: nms_thresh must be in [0, 1], got ",
              nms_thresh);
  TORCH_CHECK(detections_per_img >= 1 && topk_candidates >= 1,
              "fastbb.retinanet_postprocess: detections_per_img and topk_candidates must be >= 1");
  TORCH_CHECK(box_coder_weights.size() == 4, "fastbb.retinanet_postprocess: box_coder_weights must hold 4 numbers");

  Options o;
  o.num_classes = cls_logits.size(2);
  int64_t start = 0;
  for (const int64_t count : num_anchors_per_level) {
    TORCH_CHECK(count >= 0, "fastbb.retinanet_postprocess: num_anchors_per_level must be >= 0");
    o.level_start.push_back(start);
    o.level_count.push_back(count);
    start += count;
  }
  TORCH_CHECK(start == num_anchors, "fastbb.retinanet_postprocess: num_anchors_per_level must sum to A = ", num_anchors,
              ", got ", start);
  o.score_thresh = score_thresh;
  o.nms_thresh = nms_thresh;
  o.detections_per_img = detections_per_img;
  o.topk_candidates = topk_candidates;
  o.decode = torchvision_decode_params(box_coder_weights[0], box_coder_weights[1], box_coder_weights[2],
                                       box_coder_weights[3]);

  const auto options = cls_logits.options();
  at::Tensor boxes = at::zeros({num_images, detections_per_img, 4}, options);
  at::Tensor scores = at::zeros({num_images, detections_per_img}, options);
  at::Tensor labels = at::zeros({num_images, detections_per_img}, options.dtype(at::kLong));
  at::Tensor counts = at::zeros({num_images}, options.dtype(at::kLong));
  if (num_images == 0 || o.num_classes == 0) return {boxes, scores, labels, counts};

  const at::Tensor logits = cls_logits.contiguous();
  const at::Tensor regression = bbox_regression.contiguous();
  const at::Tensor sizes = image_sizes.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "retinanet_postprocess_cpu", [&] {
    postprocess<scalar_t>(logits, regression, anchor_data, sizes.const_data_ptr<int64_t>(), o, boxes, scores,
                          labels, counts);
  });
  return {boxes, scores, labels, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) { m.impl("retinanet_postprocess", &retinanet_postprocess_cpu); }

}  // namespace fastbb
