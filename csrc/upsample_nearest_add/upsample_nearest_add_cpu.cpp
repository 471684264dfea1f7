// CPU kernels of the FPN merge ops (schemas in fastbb/ops/upsample_nearest_add.py):
//   fastbb_C::upsample_nearest_add_out(top, lateral, out!)              out = lateral + nearest(top)
//   fastbb_C::upsample_nearest_backward(grad_out, top_height, top_width) -> grad_top
//
// nearest(top) is F.interpolate(top, size=lateral's, mode="nearest") (index rule in upsample_nearest.h).
// top, lateral and out share one memory format, contiguous NCHW or channels_last; out may be lateral
// itself, since every element is written by the thread that has just read it.
//
// 16-bit values are widened to float32, summed there and rounded once, which is what eager PyTorch
// computes. The backward adds the gradients that reach a top element in row-major order of the output
// (rows ascending, columns ascending within a row) into one accumulator that starts at +0. That is the
// order of ATen's CPU kernel, so results repeat bit for bit whatever the thread count, and equal eager's
// in float32 and float64.

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <sstream>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

#include "upsample_nearest_add/upsample_nearest.h"

namespace fastbb {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Threads get at least this many elements each: below it, starting them costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_item));
}

// ---------------------------------------------------------------------------------------------------
// Conversions between the tensor dtype and acc_t (cpu_simd.h), and the additions of the forward built on
// them. For half, the compiler targets plain x86-64 here, where c10's conversion is a long branchy
// sequence; F16C, where the CPU has it, converts eight at once and rounds the same (IEEE, to nearest even).

using simd::as_acc;
using simd::narrow;

inline float to_acc(float value) { return value; }
inline double to_acc(double value) { return value; }
inline float to_acc(c10::BFloat16 value) { return simd::bf16_to_float(value); }

template <typename scalar_t>
inline scalar_t from_acc(acc_type<scalar_t> value) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return simd::float_to_bf16(value);
  } else {
    return value;
  }
}

// out = a + b, rounded once.
template <typename scalar_t, typename acc_t>
FASTBB_AVX2_CLONES void add_arrays(const scalar_t* __restrict__ a, const acc_t* __restrict__ b,
                                  scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_acc<scalar_t>(to_acc(a[i]) + b[i]);
}

// out += b: a loop of its own for out == lateral. restrict cannot promise that case, and without the
// promise the compiler vectorizes behind a run-time overlap test that an exact alias fails.
template <typename scalar_t, typename acc_t>
FASTBB_AVX2_CLONES void add_into(scalar_t* __restrict__ out, const acc_t* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_acc<scalar_t>(to_acc(out[i]) + b[i]);
}

#ifdef FASTBB_X86
// out = a + b with out == a allowed: each block of eight is loaded before it is stored.
__attribute__((target("avx,f16c"))) void add_f16c(const c10::Half* a, const float* b, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 sum = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                                     _mm256_loadu_ps(b + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) out[i].x = _cvtss_sh(_cvtsh_ss(a[i].x) + b[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

void add_arrays(const c10::Half* a, const float* b, c10::Half* out, int64_t n) {
#ifdef FASTBB_X86
  if (simd::cpu_has_f16c()) return add_f16c(a, b, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<c10::Half>(static_cast<float>(a[i]) + b[i]);
}

void add_into(c10::Half* out, const float* b, int64_t n) { add_arrays(out, b, out, n); }

// Large float32 and float64 outputs are written with streaming stores, which go to memory without first
// reading the line into the cache: a third less traffic for out = lateral + top (top is small), and an
// output that does not fit the cache would be evicted before its next use anyway. The elements before
// and after the 16-byte-aligned body of a row are streamed one by one: an ordinary store to a line that
// the neighbouring row streams would make both slow. SSE2 is part of x86-64, so no dispatch is needed.
constexpr int64_t kStreamingMinBytes = int64_t(16) << 20;

#ifdef FASTBB_X86
inline void stream_value(float* dst, float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  _mm_stream_si32(reinterpret_cast<int32_t*>(dst), bits);
}

inline void stream_value(double* dst, double value) {
  long long bits;
  std::memcpy(&bits, &value, sizeof(bits));
  _mm_stream_si64(reinterpret_cast<long long*>(dst), bits);
}

void add_arrays_streaming(const float* a, const float* b, float* out, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(out + i) % 16 != 0; ++i) stream_value(out + i, a[i] + b[i]);
  for (; i + 4 <= n; i += 4) _mm_stream_ps(out + i, _mm_add_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
  for (; i < n; ++i) stream_value(out + i, a[i] + b[i]);
}

void add_arrays_streaming(const double* a, const double* b, double* out, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(out + i) % 16 != 0; ++i) stream_value(out + i, a[i] + b[i]);
  for (; i + 2 <= n; i += 2) _mm_stream_pd(out + i, _mm_add_pd(_mm_loadu_pd(a + i), _mm_loadu_pd(b + i)));
  for (; i < n; ++i) stream_value(out + i, a[i] + b[i]);
}
#endif

// out = a + b for out != a, streamed when asked and possible.
template <typename scalar_t, typename acc_t>
void add_to_output(const scalar_t* a, const acc_t* b, scalar_t* out, int64_t n, bool streaming) {
#ifdef FASTBB_X86
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (streaming) return add_arrays_streaming(a, b, out, n);
  }
#endif
  add_arrays(a, b, out, n);
}

bool use_streaming(int64_t out_bytes, bool in_place) {
#ifdef FASTBB_X86
  return !in_place && out_bytes >= kStreamingMinBytes;
#else
  return false;
#endif
}

// Streaming stores are weakly ordered: fence them before the thread reports its part done.
void finish_streaming(bool streaming) {
#ifdef FASTBB_X86
  if (streaming) _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------------------
// Index tables

std::vector<int64_t> source_indices(int64_t in_size, int64_t out_size) {
  std::vector<int64_t> src(out_size);
  for (int64_t i = 0; i < out_size; ++i) src[i] = nearest_source_index(i, in_size, out_size);
  return src;
}

// Source i feeds outputs window[i] .. window[i + 1] - 1: the rule is monotone, so those are contiguous
// (and under float rounding possibly none).
std::vector<int64_t> source_windows(int64_t in_size, int64_t out_size) {
  const std::vector<int64_t> src = source_indices(in_size, out_size);
  std::vector<int64_t> window(in_size + 1);
  int64_t dst = 0;
  for (int64_t i = 0; i <= in_size; ++i) {
    while (dst < out_size && src[dst] < i) ++dst;
    window[i] = dst;
  }
  return window;
}

// Consecutive sources whose windows have one length. Along a row, the loops run over these runs: a
// doubled axis is a single run of length 2, an odd size such as 167 from 84 two or three runs, and within
// a run the access pattern is fixed, so the loops vectorize.
struct WindowRun {
  int64_t first_source;
  int64_t count;
  int64_t first_output;
  int64_t length;
};

std::vector<WindowRun> window_runs(int64_t in_size, int64_t out_size) {
  const std::vector<int64_t> window = source_windows(in_size, out_size);
  std::vector<WindowRun> runs;
  for (int64_t i = 0; i < in_size; ++i) {
    const int64_t length = window[i + 1] - window[i];
    if (!runs.empty() && runs.back().length == length) {
      ++runs.back().count;
    } else {
      runs.push_back({i, 1, window[i], length});
    }
  }
  return runs;
}

// ---------------------------------------------------------------------------------------------------
// Forward

// One top row repeated along the output width; `pixel` values per column.
template <typename acc_t>
FASTBB_AVX2_CLONES void stretch_row(const acc_t* __restrict__ top_row, acc_t* __restrict__ stretched,
                                   const std::vector<WindowRun>& runs, int64_t pixel) {
  for (const WindowRun& run : runs) {
    const acc_t* src = top_row + run.first_source * pixel;
    acc_t* dst = stretched + run.first_output * pixel;
    if (pixel == 1 && run.length == 1) {
      for (int64_t k = 0; k < run.count; ++k) dst[k] = src[k];
    } else if (pixel == 1 && run.length == 2) {
      for (int64_t k = 0; k < run.count; ++k) {
        dst[2 * k] = src[k];
        dst[2 * k + 1] = src[k];
      }
    } else {
      for (int64_t k = 0; k < run.count; ++k) {
        for (int64_t t = 0; t < run.length; ++t) {
          std::copy_n(src + k * pixel, pixel, dst + (k * run.length + t) * pixel);
        }
      }
    }
  }
}

// Both memory formats as rows: `planes` stacks of H rows (of the output; h of top), each row W columns of
// `pixel` values. Contiguous NCHW: N * C planes, pixel 1. channels_last: N planes, pixel C.
struct RowLayout {
  int64_t planes, pixel, h, w, H, W;
};

// Channels-last pixels of at least this many values are added straight from the top row; smaller ones
// are first stretched into a full output row, so that each row is one long addition.
constexpr int64_t kMinDirectPixel = 64;

template <typename scalar_t>
void forward_rows(const scalar_t* top, const scalar_t* lateral, scalar_t* out, const RowLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kWidens = !std::is_same_v<scalar_t, acc_t>;
  const int64_t planes = layout.planes, pixel = layout.pixel;
  const int64_t h = layout.h, w = layout.w, H = layout.H, W = layout.W;
  const int64_t row_size = W * pixel;
  const int64_t top_row_size = w * pixel;
  const std::vector<int64_t> src_y = source_indices(h, H);
  const std::vector<int64_t> src_x = source_indices(w, W);
  const std::vector<WindowRun> runs_x = window_runs(w, W);
  const bool direct = w == W || pixel >= kMinDirectPixel;
  const bool in_place = out == lateral;
  const bool streaming = !kWidens && use_streaming(planes * H * row_size * int64_t(sizeof(scalar_t)), in_place);
  auto add_segment = [&](const acc_t* addend, int64_t offset, int64_t n) {
    if (in_place) {
      add_into(out + offset, addend, n);
    } else {
      add_to_output(lateral + offset, addend, out + offset, n, streaming);
    }
  };
  // Items are output rows of all planes together, so that a single large plane still splits.
  at::parallel_for(0, planes * H, grain_for(row_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> stretched(direct ? 0 : row_size), top_buffer(kWidens ? top_row_size : 0);
    const acc_t* top_values = nullptr;
    int64_t top_values_row = -1;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / H;
      const int64_t top_row = plane * h + src_y[row - plane * H];
      // Consecutive output rows mostly read the same top row: convert and stretch it once for all.
      if (top_row != top_values_row) {
        top_values = as_acc(top + top_row * top_row_size, top_buffer.data(), top_row_size);
        if (!direct) stretch_row(top_values, stretched.data(), runs_x, pixel);
        top_values_row = top_row;
      }
      if (w == W) {
        add_segment(top_values, row * row_size, row_size);
      } else if (direct) {
        for (int64_t x = 0; x < W; ++x) add_segment(top_values + src_x[x] * pixel, (row * W + x) * pixel, pixel);
      } else {
        add_segment(stretched.data(), row * row_size, row_size);
      }
    }
    finish_streaming(streaming);
  });
}

// Whether the tensors (named by `names`) are channels_last; they must all be dense in one format.
// Contiguous NCHW is preferred when both fit (C == 1 or a 1x1 image, where the two address every element
// alike).
bool all_channels_last(std::initializer_list<const at::Tensor*> tensors, const char* op, const char* names) {
  bool contiguous = true, channels_last = true;
  for (const at::Tensor* t : tensors) {
    contiguous = contiguous && t->is_contiguous();
    channels_last = channels_last && t->is_contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (!contiguous && !channels_last) {
    std::ostringstream strides;
    for (const at::Tensor* t : tensors) strides << " " << t->strides();
    TORCH_CHECK(false, op, ": ", names, " must be contiguous (NCHW) or channels_last-contiguous",
                tensors.size() > 1 ? ", all in the same format" : "", "; got strides", strides.str());
  }
  return !contiguous;
}

void upsample_nearest_add_out_cpu(const at::Tensor& top, const at::Tensor& lateral, const at::Tensor& out) {
  constexpr const char* kOp = "fastbb.upsample_nearest_add";
  TORCH_CHECK(top.dim() == 4, kOp, ": top must be 4-D (N, C, h, w), got ", top.sizes());
  TORCH_CHECK(lateral.dim() == 4, kOp, ": lateral must be 4-D (N, C, H, W), got ", lateral.sizes());
  TORCH_CHECK(out.sizes() == lateral.sizes(), kOp, ": out must have lateral's shape ", lateral.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(top.size(0) == lateral.size(0) && top.size(1) == lateral.size(1), kOp,
              ": top and lateral must agree in N and C, got ", top.sizes(), " and ", lateral.sizes());
  TORCH_CHECK(top.scalar_type() == lateral.scalar_type() && out.scalar_type() == lateral.scalar_type(), kOp,
              ": top, lateral and out must have one dtype, got ", top.scalar_type(), ", ", lateral.scalar_type(),
              " and ", out.scalar_type());
  TORCH_CHECK(top.device().is_cpu() && lateral.device().is_cpu() && out.device().is_cpu(), kOp,
              ": top, lateral and out must be CPU tensors");
  const int64_t N = lateral.size(0), C = lateral.size(1), H = lateral.size(2), W = lateral.size(3);
  const int64_t h = top.size(2), w = top.size(3);
  TORCH_CHECK(h <= H && w <= W, kOp, ": top (", h, "x", w, ") must not be larger than lateral (", H, "x", W, ")");
  if (lateral.numel() == 0) return;
  TORCH_CHECK(h > 0 && w > 0, kOp, ": top must not be empty in height or width when lateral is not");
  const bool channels_last = all_channels_last({&top, &lateral, &out}, kOp, "top, lateral and out");
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, lateral);
  at::assert_no_overlap(out, top);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lateral.scalar_type(), kOp, [&] {
    const scalar_t* top_data = top.const_data_ptr<scalar_t>();
    const scalar_t* lateral_data = lateral.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const RowLayout layout = channels_last ? RowLayout{N, C, h, w, H, W} : RowLayout{N * C, 1, h, w, H, W};
    forward_rows(top_data, lateral_data, out_data, layout);
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward

// Adds one gradient row into the accumulators of one top row, each window in order.
template <typename acc_t>
FASTBB_AVX2_CLONES void accumulate_row(acc_t* __restrict__ acc, const acc_t* __restrict__ grad,
                                      const std::vector<WindowRun>& runs, int64_t pixel) {
  for (const WindowRun& run : runs) {
    acc_t* a = acc + run.first_source * pixel;
    const acc_t* g = grad + run.first_output * pixel;
    if (pixel == 1 && run.length == 1) {
      for (int64_t k = 0; k < run.count; ++k) a[k] += g[k];
    } else if (pixel == 1 && run.length == 2) {
      for (int64_t k = 0; k < run.count; ++k) a[k] = (a[k] + g[2 * k]) + g[2 * k + 1];
    } else {
      for (int64_t k = 0; k < run.count; ++k) {
        acc_t* __restrict__ a_k = a + k * pixel;
        for (int64_t t = 0; t < run.length; ++t) {
          const acc_t* __restrict__ g_t = g + (k * run.length + t) * pixel;
          for (int64_t c = 0; c < pixel; ++c) a_k[c] += g_t[c];
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad_out, scalar_t* grad_top, const RowLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kWidens = !std::is_same_v<scalar_t, acc_t>;
  const int64_t planes = layout.planes, pixel = layout.pixel;
  const int64_t h = layout.h, w = layout.w, H = layout.H, W = layout.W;
  const int64_t row_size = W * pixel;
  const int64_t top_row_size = w * pixel;
  const std::vector<int64_t> window_y = source_windows(h, H);
  const std::vector<WindowRun> runs_x = window_runs(w, W);
  // Items are top rows; each reads its window of gradient rows, so rows are read once in all.
  at::parallel_for(0, planes * h, grain_for(H * row_size / h), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buffer(kWidens ? top_row_size : 0), grad_buffer(kWidens ? row_size : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / h;
      const int64_t i = row - plane * h;
      scalar_t* out_row = grad_top + row * top_row_size;
      acc_t* acc = kWidens ? acc_buffer.data() : reinterpret_cast<acc_t*>(out_row);
      std::fill(acc, acc + top_row_size, acc_t(0));
      for (int64_t y = window_y[i]; y < window_y[i + 1]; ++y) {
        const acc_t* grad_row = as_acc(grad_out + (plane * H + y) * row_size, grad_buffer.data(), row_size);
        accumulate_row(acc, grad_row, runs_x, pixel);
      }
      if constexpr (kWidens) narrow(acc, out_row, top_row_size);
    }
  });
}

at::Tensor upsample_nearest_backward_cpu(const at::Tensor& grad_out, int64_t top_height, int64_t top_width) {
  constexpr const char* kOp = "fastbb.upsample_nearest_add_backward";
  TORCH_CHECK(grad_out.dim() == 4, kOp, ": grad_out must be 4-D (N, C, H, W), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device().is_cpu(), kOp, ": grad_out must be a CPU tensor");
  const int64_t N = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const int64_t h = top_height, w = top_width;
  TORCH_CHECK(h >= 0 && w >= 0 && h <= H && w <= W, kOp, ": top size (", h, "x", w,
              ") must be non-negative and not larger than grad_out's (", H, "x", W, ")");
  TORCH_CHECK((h > 0 && w > 0) || H == 0 || W == 0, kOp,
              ": top size must not be empty when grad_out's height and width are not");
  const bool channels_last = all_channels_last({&grad_out}, kOp, "grad_out");
  // A grad_out dense in both formats (C == 1, a 1x1 image, or empty) counts as contiguous, here and in
  // the op's fake function, so that both give grad_top the same strides.
  const at::MemoryFormat format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor grad_top = at::empty({N, C, h, w}, grad_out.options().memory_format(format));
  if (grad_top.numel() == 0) return grad_top;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), kOp, [&] {
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    scalar_t* grad_top_data = grad_top.mutable_data_ptr<scalar_t>();
    const RowLayout layout = channels_last ? RowLayout{N, C, h, w, H, W} : RowLayout{N * C, 1, h, w, H, W};
    backward_rows(grad_data, grad_top_data, layout);
  });
  return grad_top;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("upsample_nearest_add_out", &upsample_nearest_add_out_cpu);
  m.impl("upsample_nearest_backward", &upsample_nearest_backward_cpu);
}

}  // namespace fastbb
