// CUDA kernels of the NMS ops (schemas in fastbb/ops/nms.py):
//   fastbb_C::nms_iou_mask     the 64x64 tiles of the suppression bitmask on or above the diagonal, one block
//                              per (tile, image) on grid x; the words below the diagonal are left unwritten
//   fastbb_C::nms_reduce_mask  the greedy scan of the mask on the device, one block per image; it reads
//                              only words on or above the diagonal
//   fastbb_C::nms_sorted_padded = reduce(mask): fixed shapes, no host synchronisation
//   fastbb_C::nms              sort + mask + reduce + one compaction (its size is the only host sync)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "nms/nms_threshold.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

namespace fastbb {
namespace {

constexpr int kTile = 64;
constexpr int kReduceThreads = 256;
// Shared memory a block gets without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr int64_t kDefaultSharedBytes = 48 * 1024;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

// Explicitly rounded products: nvcc would otherwise fuse `a + b - w * h` into a multiply-add and the
// IoU would no longer round like torchvision's.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename T>
__device__ __forceinline__ bool iou_above(const T* a, T area_a, const T* b, T area_b, T threshold) {
  const T w = max(static_cast<T>(0), min(a[2], b[2]) - max(a[0], b[0]));
  const T h = max(static_cast<T>(0), min(a[3], b[3]) - max(a[1], b[1]));
  const T inter = mul_rn(w, h);
  return div_rn(inter, area_a + area_b - inter) > threshold;
}

__device__ __forceinline__ int64_t clamped_count(const int64_t* counts, int64_t image, int64_t rows) {
  const int64_t n = counts[image];
  return n < 0 ? 0 : (n > rows ? rows : n);
}

// The tile-th tile (row by row) on or above the diagonal of a words x words grid of tiles, which holds
// tiles = words (words + 1) / 2 of them. Counted from the last tile backwards, the last r + 1 tile rows
// hold (r + 1)(r + 2) / 2 tiles: the tile row is the inverse of that triangular number, a double estimate
// corrected by one either way (the same mapping as kernels/nms.py's _upper_tile).
__device__ __forceinline__ void upper_tile(int64_t tile, int64_t words, int64_t tiles, int64_t& row_tile,
                                           int64_t& col_tile) {
  const int64_t back = tiles - 1 - tile;
  int64_t r = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(back) + 1.0) - 1.0) * 0.5);
  if ((r + 1) * (r + 2) / 2 <= back) ++r;
  if (r * (r + 1) / 2 > back) --r;
  row_tile = words - 1 - r;
  col_tile = words - 1 - (back - r * (r + 1) / 2);
}

// Block (kTile threads) = one tile on or above the diagonal of one image (blockIdx.x = image * tiles +
// tile); thread t owns row row_tile * 64 + t.
template <typename scalar_t, typename T>
__global__ void iou_mask_kernel(const scalar_t* __restrict__ boxes, const int64_t* __restrict__ labels,
                                const int64_t* __restrict__ counts, int64_t rows, int64_t words,
                                int64_t tiles_per_image, T threshold, unsigned long long* __restrict__ mask) {
  const int64_t image = blockIdx.x / tiles_per_image;
  int64_t row_tile, col_tile;
  upper_tile(blockIdx.x - image * tiles_per_image, words, tiles_per_image, row_tile, col_tile);
  const int t = threadIdx.x;
  const int64_t row = row_tile * kTile + t;
  const int64_t n = clamped_count(counts, image, rows);
  unsigned long long* out = mask + (image * rows + row) * words + col_tile;
  if (row_tile * kTile >= n || col_tile * kTile >= n) {  // padding rows or columns: nothing to suppress
    if (row < rows) *out = 0;
    return;
  }
  __shared__ T col_boxes[kTile][4];
  __shared__ T col_areas[kTile];
  __shared__ int64_t col_labels[kTile];
  const int64_t col0 = col_tile * kTile;
  if (col0 + t < n) {
    const scalar_t* b = boxes + (image * rows + col0 + t) * 4;
    for (int c = 0; c < 4; ++c) col_boxes[t][c] = static_cast<T>(b[c]);
    col_areas[t] = mul_rn(col_boxes[t][2] - col_boxes[t][0], col_boxes[t][3] - col_boxes[t][1]);
    col_labels[t] = labels != nullptr ? labels[image * rows + col0 + t] : 0;
  }
  __syncthreads();
  unsigned long long bits = 0;
  if (row < n) {
    const scalar_t* b = boxes + (image * rows + row) * 4;
    const T box[4] = {static_cast<T>(b[0]), static_cast<T>(b[1]), static_cast<T>(b[2]), static_cast<T>(b[3])};
    const T area = mul_rn(box[2] - box[0], box[3] - box[1]);
    const int64_t label = labels != nullptr ? labels[image * rows + row] : 0;
    const int start = col_tile == row_tile ? t + 1 : 0;
    const int end = static_cast<int>(n - col0 < kTile ? n - col0 : kTile);
    for (int j = start; j < end; ++j) {
      if (col_labels[j] == label && iou_above<T>(box, area, col_boxes[j], col_areas[j], threshold)) {
        bits |= 1ull << j;
      }
    }
  }
  if (row < rows) *out = bits;
}

// One block per image. Word by word: the 64 rows of the word are resolved sequentially by one thread
// (from the diagonal words, staged in shared memory), then the whole block ORs the rows kept in this
// word into the removed bits of the later words. Only words on or above the diagonal are read.
__global__ void reduce_mask_kernel(const unsigned long long* __restrict__ mask, const int64_t* __restrict__ counts,
                                   int64_t rows, int64_t words, unsigned long long* global_removed,
                                   bool* __restrict__ keep) {
  extern __shared__ unsigned long long shared_removed[];
  __shared__ unsigned long long diagonal[kTile];
  __shared__ unsigned long long kept_in_word;
  const int64_t image = blockIdx.x;
  const int tid = threadIdx.x;
  unsigned long long* removed = global_removed != nullptr ? global_removed + image * words : shared_removed;
  const unsigned long long* m = mask + image * rows * words;
  bool* out = keep + image * rows;
  const int64_t n = clamped_count(counts, image, rows);
  for (int64_t w = tid; w < words; w += blockDim.x) removed[w] = 0;
  for (int64_t i = tid; i < rows; i += blockDim.x) out[i] = false;
  __syncthreads();
  const int64_t used_words = (n + kTile - 1) / kTile;
  for (int64_t w = 0; w < used_words; ++w) {
    const int64_t base = w * kTile;
    const int rows_here = static_cast<int>(n - base < kTile ? n - base : kTile);
    if (tid < rows_here) diagonal[tid] = m[(base + tid) * words + w];
    __syncthreads();
    if (tid == 0) {
      unsigned long long gone = removed[w], kept = 0;
      for (int j = 0; j < rows_here; ++j) {
        if (!((gone >> j) & 1ull)) {
          kept |= 1ull << j;
          gone |= diagonal[j];
        }
      }
      kept_in_word = kept;
    }
    __syncthreads();
    const unsigned long long kept = kept_in_word;
    if (tid < rows_here && ((kept >> tid) & 1ull)) out[base + tid] = true;
    for (int64_t x = w + 1 + tid; x < used_words; x += blockDim.x) {
      unsigned long long acc = removed[x];
      for (unsigned long long left = kept; left != 0; left &= left - 1) {
        acc |= m[(base + __ffsll(static_cast<long long>(left)) - 1) * words + x];
      }
      removed[x] = acc;
    }
    __syncthreads();
  }
}

// Dynamic shared memory the reduce kernel may use on `device`: the device's opt-in limit per block less the
// kernel's static shared memory, with the kernel's own limit raised to it once per device (a launch
// asking for more than 48 KB in all fails otherwise).
int64_t reduce_shared_bytes(int device) {
  static std::mutex lock;
  static std::vector<int64_t> limits;  // per device; -1 until set
  const std::lock_guard<std::mutex> guard(lock);
  if (static_cast<int64_t>(limits.size()) <= device) limits.resize(device + 1, -1);
  if (limits[device] < 0) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, reduce_mask_kernel));
    const int64_t static_bytes = static_cast<int64_t>(attributes.sharedSizeBytes);
    int64_t dynamic = std::max<int64_t>(optin, kDefaultSharedBytes) - static_bytes;
    if (dynamic > kDefaultSharedBytes - static_bytes) {
      if (cudaFuncSetAttribute(reduce_mask_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(dynamic)) != cudaSuccess) {
        (void)cudaGetLastError();  // refused: stay within the default
        dynamic = kDefaultSharedBytes - static_bytes;
      }
    }
    limits[device] = std::max<int64_t>(dynamic, 0);
  }
  return limits[device];
}

void check_threshold(double iou_threshold) {
  TORCH_CHECK(iou_threshold >= 0.0 && iou_threshold <= 1.0,
              "fastbb.nms: iou_threshold must be in [0, 1], got ", iou_threshold);
}

void check_counts(const at::Tensor& valid_counts, int64_t batch) {
  TORCH_CHECK(valid_counts.dim() == 1 && valid_counts.size(0) == batch,
              "fastbb.nms: valid_counts must have shape (B,) = (", batch, ",), got ", valid_counts.sizes());
}

at::Tensor nms_iou_mask_cuda(const at::Tensor& boxes, const c10::optional<at::Tensor>& labels,
                             const at::Tensor& valid_counts, double iou_threshold) {
  TORCH_CHECK(boxes.is_cuda() && boxes.dim() == 3 && boxes.size(2) == 4,
              "fastbb.nms: boxes must be a CUDA tensor of shape (B, M, 4), got ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "fastbb.nms: boxes must be floating point");
  check_threshold(iou_threshold);
  const int64_t batch = boxes.size(0), rows = boxes.size(1), words = (rows + kTile - 1) / kTile;
  check_counts(valid_counts, batch);
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 2 && labels->size(0) == batch && labels->size(1) == rows &&
                    labels->scalar_type() == at::kLong,
                "fastbb.nms: labels must be int64 of shape (B, M), got ", labels->sizes());
  }
  c10::cuda::CUDAGuard guard(boxes.device());
  at::Tensor mask = at::empty({batch, rows, words}, boxes.options().dtype(at::kLong));
  if (mask.numel() == 0) return mask;
  const int64_t tiles_per_image = words * (words + 1) / 2;
  TORCH_CHECK_VALUE(tiles_per_image <= kMaxGridX / batch, "fastbb.nms_iou_mask: boxes of shape ", boxes.sizes(),
                    " need ", tiles_per_image, " tiles per image for ", batch, " images, over CUDA's grid limit of ",
                    kMaxGridX, " blocks; split the input");
  const at::Tensor box_data = boxes.contiguous();
  const at::Tensor label_data = labels.has_value() ? labels->contiguous() : at::Tensor();
  const at::Tensor counts = valid_counts.to(at::kLong).contiguous();
  const dim3 grid(static_cast<unsigned>(tiles_per_image * batch));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_iou_mask_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    iou_mask_kernel<scalar_t, T><<<grid, kTile, 0, stream>>>(
        box_data.const_data_ptr<scalar_t>(), labels.has_value() ? label_data.const_data_ptr<int64_t>() : nullptr,
        counts.const_data_ptr<int64_t>(), rows, words, tiles_per_image, threshold_below<T>(iou_threshold),
        reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

at::Tensor nms_reduce_mask_cuda(const at::Tensor& mask, const at::Tensor& valid_counts) {
  TORCH_CHECK(mask.is_cuda() && mask.dim() == 3 && mask.scalar_type() == at::kLong &&
                  mask.size(2) == (mask.size(1) + kTile - 1) / kTile,
              "fastbb.nms: mask must be a CUDA int64 tensor of shape (B, M, ceil(M / 64)), got ", mask.sizes());
  const int64_t batch = mask.size(0), rows = mask.size(1), words = mask.size(2);
  check_counts(valid_counts, batch);
  c10::cuda::CUDAGuard guard(mask.device());
  at::Tensor keep = at::empty({batch, rows}, mask.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  TORCH_CHECK_VALUE(batch <= kMaxGridX, "fastbb.nms_reduce_mask: mask of shape ", mask.sizes(), " needs ", batch,
                    " blocks, over CUDA's grid limit of ", kMaxGridX, "; split the input");
  const at::Tensor mask_data = mask.contiguous();
  const at::Tensor counts = valid_counts.to(at::kLong).contiguous();
  // The removed bits live in shared memory when they fit (up to the device's opt-in limit), else in a
  // global scratch row per image.
  const bool in_shared = words * 8 <= reduce_shared_bytes(mask.get_device());
  at::Tensor scratch = in_shared ? at::Tensor() : at::empty({batch, words}, mask.options());
  reduce_mask_kernel<<<static_cast<unsigned>(batch), kReduceThreads, in_shared ? words * 8 : 0,
                       at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const unsigned long long*>(mask_data.const_data_ptr<int64_t>()),
      counts.const_data_ptr<int64_t>(), rows, words,
      in_shared ? nullptr : reinterpret_cast<unsigned long long*>(scratch.mutable_data_ptr<int64_t>()),
      keep.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

at::Tensor nms_sorted_padded_cuda(const at::Tensor& boxes, const at::Tensor& labels, const at::Tensor& valid_counts,
                                  double iou_threshold) {
  return nms_reduce_mask_cuda(nms_iou_mask_cuda(boxes, labels, valid_counts, iou_threshold), valid_counts);
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const c10::optional<at::Tensor>& idxs,
                    double iou_threshold) {
  TORCH_CHECK(boxes.is_cuda() && boxes.dim() == 2 && boxes.size(1) == 4,
              "fastbb.nms: boxes must be a CUDA tensor of shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "fastbb.nms: scores must have shape (N,) = (", boxes.size(0), ",), got ", scores.sizes());
  check_threshold(iou_threshold);
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor ranked = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  at::Tensor order = ranked;
  c10::optional<at::Tensor> labels;
  if (idxs.has_value()) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == n, "fastbb.nms: idxs must have shape (N,) = (", n,
                ",), got ", idxs->sizes());
    // Classes made contiguous (rank order kept within each): per-class greedy results do not depend on
    // how classes interleave, and tiles of two different classes then hold no work.
    const at::Tensor ranked_labels = idxs->to(at::kLong).index_select(0, ranked);
    const at::Tensor by_class = std::get<1>(ranked_labels.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    order = ranked.index_select(0, by_class);
    labels = ranked_labels.index_select(0, by_class).unsqueeze(0);
  }
  const at::Tensor counts = at::full({1}, n, boxes.options().dtype(at::kLong));
  const at::Tensor keep_in_order =
      nms_reduce_mask_cuda(nms_iou_mask_cuda(boxes.index_select(0, order).unsqueeze(0), labels, counts,
                                             iou_threshold),
                           counts)
          .squeeze(0);
  if (!idxs.has_value()) return order.masked_select(keep_in_order);
  const at::Tensor keep = at::zeros({n}, keep_in_order.options()).index_copy_(0, order, keep_in_order);
  return ranked.masked_select(keep.index_select(0, ranked));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("nms_sorted_padded", &nms_sorted_padded_cuda);
  m.impl("nms_iou_mask", &nms_iou_mask_cuda);
  m.impl("nms_reduce_mask", &nms_reduce_mask_cuda);
}

}  // namespace fastbb
