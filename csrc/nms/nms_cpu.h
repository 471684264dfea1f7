// CPU non-maximum suppression, shared with the other CPU kernels that end in NMS.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fastbb {

// Greedy NMS with torchvision's semantics: boxes (N, 4) x1y1x2y2 of any floating dtype (IoU in float32
// for 16-bit dtypes, in the box dtype otherwise), scores (N,) floating; a box is suppressed when its IoU
// with an already kept, higher-ranked box is > iou_threshold (0 <= iou_threshold <= 1). Rank = stable
// descending sort of scores (NaN first, ties by lower index). With idxs (N,) int64, boxes only suppress
// boxes of the same idxs value. Returns the kept indices (int64) in rank order.
// Safe to call from inside an OpenMP parallel region (it then runs on the calling thread only).
at::Tensor nms_cpu_kernel(const at::Tensor& boxes, const at::Tensor& scores,
                          const c10::optional<at::Tensor>& idxs, double iou_threshold);

}  // namespace fastbb
