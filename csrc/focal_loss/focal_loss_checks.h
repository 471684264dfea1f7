// Argument checks shared by the CPU and CUDA kernels of fastbb_C::sigmoid_focal_loss (the Python
// wrapper validates user input; these guard direct calls of the private op).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fastbb {

// Returns the accumulation dtype: float64 for float64 logits, float32 otherwise.
inline at::ScalarType check_focal_loss_args(const at::Tensor& logits, const c10::optional<at::Tensor>& targets,
                                            const c10::optional<at::Tensor>& labels,
                                            const c10::optional<at::Tensor>& weight, double gamma) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "fastbb.sigmoid_focal_loss: logits must be contiguous (N, C)");
  TORCH_CHECK(targets.has_value() != labels.has_value(),
              "fastbb.sigmoid_focal_loss: give exactly one of targets, labels");
  TORCH_CHECK(gamma >= 0, "fastbb.sigmoid_focal_loss: gamma must be >= 0, got ", gamma);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (targets.has_value()) {
    TORCH_CHECK(targets->sizes() == logits.sizes() && targets->is_contiguous() &&
                    targets->scalar_type() == logits.scalar_type(),
                "fastbb.sigmoid_focal_loss: targets must be contiguous, of logits' shape and dtype");
  }
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == logits.size(0) && labels->is_contiguous() &&
                    labels->scalar_type() == at::kLong,
                "fastbb.sigmoid_focal_loss: labels must be contiguous int64 (N,)");
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->sizes() == logits.sizes() && weight->scalar_type() == acc_dtype,
                "fastbb.sigmoid_focal_loss: weight must be (N, C) in the compute dtype");
  }
  return acc_dtype;
}

}  // namespace fastbb
