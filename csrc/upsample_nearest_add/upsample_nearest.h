// The source index of PyTorch's legacy "nearest" upsampling (F.interpolate(mode="nearest") with a size),
// shared by the FPN upsample-nearest-add kernels.
//
// The scale is a float32 quotient and the product a float32 multiply, as in ATen's nearest_idx: using
// the exact rational would pick other rows for some sizes (26 -> 44 at 22 reads row 12, not 13), and
// results must match eager PyTorch bit for bit. ATen's shortcuts for equal and doubled sizes give the
// same indices as the formula for any size below 2^24; they are kept so that the rule is ATen's exactly.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fastbb {

C10_HOST_DEVICE inline int64_t nearest_source_index(int64_t dst_index, int64_t in_size, int64_t out_size) {
  if (out_size == in_size) return dst_index;
  if (out_size == 2 * in_size) return dst_index >> 1;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const int64_t src_index = static_cast<int64_t>(floorf(static_cast<float>(dst_index) * scale));
  return src_index < in_size - 1 ? src_index : in_size - 1;
}

}  // namespace fastbb
