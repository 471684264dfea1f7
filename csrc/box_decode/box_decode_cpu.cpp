// CPU kernel of fastbb_C::decode_boxes (schema in fastbb/ops/box_decode.py).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#define FASTBB_BOX_DECODE_OP
#include "box_decode/box_decode.h"

namespace fastbb {
namespace {

template <typename scalar_t>
void decode_boxes_cpu_impl(const at::Tensor& anchors, const at::Tensor& deltas,
                           const c10::optional<at::Tensor>& image_sizes, const BoxDecodeParams& base,
                           at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_anchors = anchors.size(0);
  const int64_t boxes_per_row = deltas.size(-1) / 4;
  const int64_t num_rows = deltas.numel() / deltas.size(-1);
  const int64_t num_images = image_sizes.has_value() ? image_sizes->size(0) : 1;
  const int64_t rows_per_image = num_rows / num_images;
  const scalar_t* anchor_data = anchors.const_data_ptr<scalar_t>();
  const scalar_t* delta_data = deltas.const_data_ptr<scalar_t>();
  const acc_t* size_data = image_sizes.has_value() ? image_sizes->const_data_ptr<acc_t>() : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();

  // At least ~4096 boxes per thread: below that, threads cost more than they save.
  const int64_t grain = std::max<int64_t>(1, 4096 / boxes_per_row);
  // Rows are decoded in blocks: first every box's exponents, then one call of ATen's vectorized exp on
  // the block (a scalar exp per value is most of the time otherwise), then the boxes themselves.
  constexpr int64_t kBlockBoxes = 2048;
  const auto exp_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    BoxDecodeParams p = base;
    std::vector<acc_t> exps(2 * kBlockBoxes);
    const at::Tensor exps_view = at::from_blob(exps.data(), {2 * kBlockBoxes}, at::TensorOptions(exp_dtype));
    // Anchor and image indices advance with the row, so the loop does no integer division.
    int64_t anchor = begin % num_anchors;
    int64_t image = begin / rows_per_image;
    int64_t next_image_row = (image + 1) * rows_per_image;
    if (size_data != nullptr) {
      p.clip_h = static_cast<double>(size_data[2 * image]);
      p.clip_w = static_cast<double>(size_data[2 * image + 1]);
    }
    const int64_t rows_per_block = std::max<int64_t>(1, kBlockBoxes / boxes_per_row);
    for (int64_t block = begin; block < end; block += rows_per_block) {
      const int64_t block_end = std::min(end, block + rows_per_block);
      const int64_t first_box = block * boxes_per_row;
      const int64_t num_boxes = (block_end - block) * boxes_per_row;
      for (int64_t i = 0; i < num_boxes; ++i) {
        decode_box_exponents<acc_t>(delta_data + 4 * (first_box + i), p, &exps[2 * i]);
      }
      exps_view.narrow(0, 0, 2 * num_boxes).exp_();
      for (int64_t row = block; row < block_end; ++row) {
        if (size_data != nullptr && row == next_image_row) {
          ++image;
          next_image_row += rows_per_image;
          p.clip_h = static_cast<double>(size_data[2 * image]);
          p.clip_w = static_cast<double>(size_data[2 * image + 1]);
        }
        const scalar_t* a = anchor_data + 4 * anchor;
        for (int64_t k = 0; k < boxes_per_row; ++k) {
          const int64_t box = row * boxes_per_row + k;
          const acc_t* e = &exps[2 * (box - first_box)];
          acc_t decoded[4];
          decode_box_scaled<acc_t>(a, delta_data + 4 * box, p, e[0], e[1], decoded);
          for (int i = 0; i < 4; ++i) out_data[4 * box + i] = static_cast<scalar_t>(decoded[i]);
        }
        if (++anchor == num_anchors) anchor = 0;
      }
    }
  });
}

at::Tensor decode_boxes_cpu(const at::Tensor& anchors, const at::Tensor& deltas,
                            const c10::optional<at::Tensor>& image_sizes, int64_t style,
                            at::ArrayRef<double> weights, at::ArrayRef<double> means,
                            at::ArrayRef<double> stds, double dwh_min, double dwh_max, double dxy_max,
                            at::ArrayRef<double> image_size) {
  check_decode_boxes_args(anchors, deltas, image_sizes, c10::DeviceType::CPU);
  const BoxDecodeParams params =
      make_decode_params(style, weights, means, stds, dwh_min, dwh_max, dxy_max, image_size, image_sizes);
  const at::Tensor anchors_c = anchors.contiguous();
  const at::Tensor deltas_c = deltas.contiguous();
  c10::optional<at::Tensor> sizes_c;
  if (image_sizes.has_value()) sizes_c = image_sizes->contiguous();
  at::Tensor out = at::empty_like(deltas_c);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, deltas.scalar_type(), "decode_boxes_cpu", [&] {
    decode_boxes_cpu_impl<scalar_t>(anchors_c, deltas_c, sizes_c, params, out);
  });
  return out;
}

}  // namespace
}  // namespace fastbb

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) { m.impl("decode_boxes", &fastbb::decode_boxes_cpu); }
