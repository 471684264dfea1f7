// CPU kernel of fastbb_C::sigmoid_focal_loss (schema and the math in fastbb/ops/focal_loss.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "cpu_alloc.h"
#include "focal_loss/focal_loss_checks.h"

// The element loop is also compiled for AVX2, chosen at load time where the CPU has it. Its helpers are
// forced inline so that each clone vectorizes them with its own instructions.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 9
#define FASTBB_FOCAL_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTBB_FOCAL_INLINE inline __attribute__((always_inline))
#else
#define FASTBB_FOCAL_CLONES
#define FASTBB_FOCAL_INLINE inline
#endif

namespace fastbb {
namespace {

// exp(y) for -87 <= y <= 0, branch-free so that the element loop vectorizes: 2^n exp(r), |r| <= ln2 / 2,
// with a degree-7 Taylor polynomial (error below float's ulp).
FASTBB_FOCAL_INLINE float exp_nonpositive(float y) {
  constexpr float kLog2e = 1.44269504089f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * kLog2e + kRound) - kRound;
  const float r = (y - n * kLn2Hi) - n * kLn2Lo;
  float poly = 1.0f / 5040;
  poly = poly * r + 1.0f / 720;
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return poly * two_n;
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, a series in s^2 (error < 1e-9).
FASTBB_FOCAL_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float poly = 1.0f / 15;
  poly = poly * s2 + 1.0f / 13;
  poly = poly * s2 + 1.0f / 11;
  poly = poly * s2 + 1.0f / 9;
  poly = poly * s2 + 1.0f / 7;
  poly = poly * s2 + 1.0f / 5;
  poly = poly * s2 + 1.0f / 3;
  poly = poly * s2 + 1.0f;
  return 2.0f * s * poly;
}

FASTBB_FOCAL_INLINE double exp_nonpositive(double y) { return std::exp(y); }
FASTBB_FOCAL_INLINE double log1p_unit(double e) { return std::log1p(e); }

// 1 when the sign bit of y is clear, else 0. Read from the bits: a floating-point comparison here would
// keep the loop from vectorizing (GCC does not if-convert possibly trapping compares by default).
FASTBB_FOCAL_INLINE float nonnegative(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  return static_cast<float>(1 - static_cast<int32_t>(bits >> 31));
}

FASTBB_FOCAL_INLINE double nonnegative(double y) {
  uint64_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  return static_cast<double>(1 - static_cast<int64_t>(bits >> 63));
}

// Smallest exponent passed to exp: exp(-87) ~ 1.6e-38 stands for anything smaller, where it only ever
// adds to or multiplies values that make it vanish. float64 takes the exact exp.
template <typename acc_t>
constexpr acc_t kMinExponent = std::is_same_v<acc_t, float> ? acc_t(-87) : -std::numeric_limits<acc_t>::infinity();


struct FocalParams {
  double alpha_pos;  // alpha_t of a positive target (t = 1)
  double alpha_neg;  // alpha_t of a negative target (t = 0)
  double gamma;
};

// log(m) for a normal m > 0, branch-free: m = 2^k f with f in [sqrt(1/2), sqrt(2)) taken from the bits,
// log f = 2 atanh(s), s = (f - 1) / (f + 1), |s| < 0.172 (series error < 1e-9).
FASTBB_FOCAL_INLINE float log_positive(float m) {
  constexpr int32_t kSqrtHalfBits = 0x3f3504f3;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  int32_t bits;
  std::memcpy(&bits, &m, sizeof(bits));
  const int32_t shifted = bits - kSqrtHalfBits;
  const int32_t mantissa_bits = (shifted & 0x007fffff) + kSqrtHalfBits;
  const float k = static_cast<float>(shifted >> 23);
  float f;
  std::memcpy(&f, &mantissa_bits, sizeof(f));
  const float s = (f - 1.0f) / (f + 1.0f);
  const float s2 = s * s;
  float poly = 1.0f / 9;
  poly = poly * s2 + 1.0f / 7;
  poly = poly * s2 + 1.0f / 5;
  poly = poly * s2 + 1.0f / 3;
  poly = poly * s2 + 1.0f;
  return k * kLn2Hi + (k * kLn2Lo + 2.0f * s * poly);
}

// p = sigmoid(x), q = 1 - p and the softplus terms, from e = exp(-|x|).
template <typename acc_t>
struct SigmoidParts {
  acc_t p, q, softplus_pos, softplus_neg;  // softplus_pos = softplus(x) = -log q, softplus_neg = -log p
};

template <typename acc_t>
FASTBB_FOCAL_INLINE SigmoidParts<acc_t> sigmoid_parts(acc_t x, acc_t e) {
  const acc_t d = acc_t(1) / (acc_t(1) + e);
  const acc_t c = nonnegative(x);
  const acc_t log1p_e = log1p_unit(e);
  return {c * d + (acc_t(1) - c) * (e * d), c * (e * d) + (acc_t(1) - c) * d, c * x + log1p_e,
          (c - acc_t(1)) * x + log1p_e};
}

// Loss and gradient of n elements; `exponent` and `power` are scratch for n values each. kGammaTwo:
// m^gamma = m * m (the default gamma); otherwise exp(gamma log m) in float, pow in float64.
template <typename acc_t, bool kGammaTwo, bool kGrad>
FASTBB_FOCAL_CLONES void focal_elements(int64_t n, const acc_t* __restrict__ x, const acc_t* __restrict__ t,
                                        const acc_t* __restrict__ w, const FocalParams& params,
                                        acc_t* __restrict__ exponent, acc_t* __restrict__ power,
                                        acc_t* __restrict__ loss, acc_t* __restrict__ grad) {
  constexpr bool kFastPower = !kGammaTwo && std::is_same_v<acc_t, float>;
  const acc_t alpha_pos = static_cast<acc_t>(params.alpha_pos);
  const acc_t alpha_neg = static_cast<acc_t>(params.alpha_neg);
  const acc_t gamma = static_cast<acc_t>(params.gamma);
  // Each clamp has a loop of its own: inside the main loop, GCC would split the loop at it (the clamped
  // branch folds to constants) and vectorize neither.
  for (int64_t i = 0; i < n; ++i) {
    const acc_t y = -std::abs(x[i]);
    exponent[i] = y < kMinExponent<acc_t> ? kMinExponent<acc_t> : y;
  }
  if constexpr (kFastPower) {
    // m >= exp(-87) / 2 > 0 (a normal float) for targets in [0, 1], so its log is finite.
    for (int64_t i = 0; i < n; ++i) {
      const SigmoidParts<acc_t> s = sigmoid_parts(x[i], exp_nonpositive(exponent[i]));
      power[i] = gamma * log_positive(s.p * (acc_t(1) - t[i]) + s.q * t[i]);
    }
    for (int64_t i = 0; i < n; ++i) {
      power[i] = power[i] < kMinExponent<acc_t> ? kMinExponent<acc_t> : power[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t ti = t[i];
    const SigmoidParts<acc_t> s = sigmoid_parts(x[i], exp_nonpositive(exponent[i]));
    const acc_t ce = ti * s.softplus_neg + (acc_t(1) - ti) * s.softplus_pos;
    const acc_t m = s.p * (acc_t(1) - ti) + s.q * ti;
    acc_t m_gamma, m_gamma_1;
    if constexpr (kGammaTwo) {
      m_gamma_1 = m;
      m_gamma = m * m;
    } else if constexpr (kFastPower) {
      m_gamma = exp_nonpositive(power[i]);
      m_gamma_1 = m_gamma / m;
    } else {
      m_gamma = std::pow(m, gamma);
      // gamma = 0: no gamma term (PyTorch's pow backward is 0 for exponent 0); computing it would give
      // 0 * inf = NaN where m is subnormal (float64 |x| in about (708, 745)) and m^-1 overflows.
      m_gamma_1 = gamma == acc_t(0) ? acc_t(0)
                  : m > 0          ? std::pow(m, gamma - acc_t(1))
                                   : (gamma == acc_t(1) ? acc_t(1) : acc_t(0));
    }
    const acc_t scale = (alpha_pos * ti + alpha_neg * (acc_t(1) - ti)) * w[i];
    loss[i] = scale * ce * m_gamma;
    if constexpr (kGrad) {
      grad[i] = scale * ((s.p - ti) * m_gamma + gamma * ce * m_gamma_1 * s.p * s.q * (acc_t(1) - acc_t(2) * ti));
    }
  }
}

// Fixed-order sum of n values: eight interleaved partial sums, then those in order.
template <typename acc_t>
acc_t ordered_sum(const acc_t* values, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] += values[i + k];
  }
  for (; i < n; ++i) lanes[i % 8] += values[i];
  acc_t total = 0;
  for (int k = 0; k < 8; ++k) total += lanes[k];
  return total;
}

// Elements are processed in fixed chunks of the flattened (N, C) array, whatever the thread count: each
// chunk's sum is computed alone and the chunk sums are added in order, so results repeat bit for bit.
constexpr int64_t kChunk = 4096;

template <typename scalar_t>
void focal_loss_cpu_impl(const at::Tensor& logits, const c10::optional<at::Tensor>& targets,
                         const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& weight,
                         const FocalParams& params, int64_t ignore_index, bool reduce, bool compute_grad,
                         at::Tensor& loss_out, at::Tensor& grad_out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kAccIsScalar = std::is_same_v<scalar_t, acc_t>;
  const int64_t num_classes = logits.size(1);
  const int64_t total = logits.numel();
  const int64_t num_chunks = (total + kChunk - 1) / kChunk;
  const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
  const scalar_t* target_data = targets.has_value() ? targets->const_data_ptr<scalar_t>() : nullptr;
  const int64_t* label_data = labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr;
  const acc_t* weight_data = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  const int64_t weight_row_stride = weight.has_value() ? weight->stride(0) : 0;
  const int64_t weight_col_stride = weight.has_value() ? weight->stride(1) : 0;
  scalar_t* loss_data = reduce ? nullptr : loss_out.mutable_data_ptr<scalar_t>();
  scalar_t* grad_data = compute_grad ? grad_out.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> chunk_sums(reduce ? num_chunks : 0);
  const bool gamma_two = params.gamma == 2.0;

  at::parallel_for(0, num_chunks, 4, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_buf(kAccIsScalar ? 0 : kChunk), t_buf(kChunk), w_buf(kChunk, acc_t(1));
    std::vector<acc_t> e_buf(kChunk), power_buf(gamma_two ? 0 : kChunk), loss_buf(kChunk);
    std::vector<acc_t> grad_buf(compute_grad ? kChunk : 0);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t start = chunk * kChunk;
      const int64_t n = std::min(kChunk, total - start);
      const acc_t* x;
      if constexpr (kAccIsScalar) {
        x = logit_data + start;
      } else {
        for (int64_t i = 0; i < n; ++i) x_buf[i] = static_cast<acc_t>(logit_data[start + i]);
        x = x_buf.data();
      }
      const acc_t* t = t_buf.data();
      if (target_data != nullptr) {
        if constexpr (kAccIsScalar) {
          t = target_data + start;
        } else {
          for (int64_t i = 0; i < n; ++i) t_buf[i] = static_cast<acc_t>(target_data[start + i]);
        }
      }
      if (weight_data != nullptr) {
        int64_t row = start / num_classes, col = start % num_classes;
        for (int64_t i = 0; i < n; ++i) {
          w_buf[i] = weight_data[row * weight_row_stride + col * weight_col_stride];
          if (++col == num_classes) {
            col = 0;
            ++row;
          }
        }
      }
      if (label_data != nullptr) {
        std::fill(t_buf.begin(), t_buf.begin() + n, acc_t(0));
        const int64_t first_row = start / num_classes;
        const int64_t last_row = (start + n - 1) / num_classes;
        for (int64_t row = first_row; row <= last_row; ++row) {
          const int64_t label = label_data[row];
          TORCH_CHECK((label >= -1 && label <= num_classes) || label == ignore_index,
                      "fastbb.sigmoid_focal_loss_labels: labels must be in [-1, ", num_classes, "] or ignore_index (",
                      ignore_index, "), got ", label);
          const int64_t row_begin = std::max(row * num_classes, start) - start;
          const int64_t row_end = std::min((row + 1) * num_classes, start + n) - start;
          if (label == ignore_index) {
            std::fill(w_buf.begin() + row_begin, w_buf.begin() + row_end, acc_t(0));
          } else if (label >= 0 && label < num_classes) {
            const int64_t at = row * num_classes + label - start;
            if (at >= row_begin && at < row_end) t_buf[at] = acc_t(1);
          }
        }
      }
      acc_t* loss = (kAccIsScalar && !reduce) ? reinterpret_cast<acc_t*>(loss_data) + start : loss_buf.data();
      acc_t* grad = kAccIsScalar && compute_grad ? reinterpret_cast<acc_t*>(grad_data) + start : grad_buf.data();
      const acc_t* w = w_buf.data();
      acc_t* scratch_e = e_buf.data();
      acc_t* scratch_power = power_buf.data();
      if (gamma_two && compute_grad) {
        focal_elements<acc_t, true, true>(n, x, t, w, params, scratch_e, scratch_power, loss, grad);
      } else if (gamma_two) {
        focal_elements<acc_t, true, false>(n, x, t, w, params, scratch_e, scratch_power, loss, grad);
      } else if (compute_grad) {
        focal_elements<acc_t, false, true>(n, x, t, w, params, scratch_e, scratch_power, loss, grad);
      } else {
        focal_elements<acc_t, false, false>(n, x, t, w, params, scratch_e, scratch_power, loss, grad);
      }
      if (reduce) {
        chunk_sums[chunk] = ordered_sum(loss, n);
      } else if constexpr (!kAccIsScalar) {
        for (int64_t i = 0; i < n; ++i) loss_data[start + i] = static_cast<scalar_t>(loss[i]);
      }
      if constexpr (!kAccIsScalar) {
        if (compute_grad) {
          for (int64_t i = 0; i < n; ++i) grad_data[start + i] = static_cast<scalar_t>(grad[i]);
        }
      }
      if (weight_data != nullptr || label_data != nullptr) {
        std::fill(w_buf.begin(), w_buf.begin() + n, acc_t(1));
      }
    }
  });
  if (reduce) {
    double total_sum = 0;
    for (const acc_t s : chunk_sums) total_sum += static_cast<double>(s);
    loss_out.fill_(total_sum);
  }
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_cpu(
    const at::Tensor& logits, const c10::optional<at::Tensor>& targets, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weight, double alpha, double gamma, int64_t ignore_index, bool reduce,
    bool compute_grad) {
  const auto acc_dtype = check_focal_loss_args(logits, targets, labels, weight, gamma);
  const FocalParams params{alpha >= 0 ? alpha : 1.0, alpha >= 0 ? 1.0 - alpha : 1.0, gamma};
  // The per-element outputs are as large as the logits: on huge pages (cpu_alloc.h)
  at::Tensor loss = reduce ? at::empty({}, logits.options().dtype(acc_dtype)) : empty_like_huge_pages(logits);
  at::Tensor grad = compute_grad ? empty_like_huge_pages(logits) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_focal_loss_cpu", [&] {
    focal_loss_cpu_impl<scalar_t>(logits, targets, labels, weight, params, ignore_index, reduce, compute_grad,
                                  loss, grad);
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cpu);
}

}  // namespace fastbb
