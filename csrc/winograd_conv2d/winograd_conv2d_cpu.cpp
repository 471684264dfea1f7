// Winograd F(2x2, 3x3) and F(4x4, 3x3) convs of conv_bn_relu's CPU convs (schemas in
// fastbb/ops/conv_bn_relu/cpu_conv.py); `tile` is the output tile's side m (2 or 4) and a = m + 2 the input
// patch's:
//   fastbb_C::winograd_weight(weight, tile) -> u (a*a, K, C)
//   fastbb_C::winograd_weight_of_input_gradient(weight, tile) -> (a*a, C, K), the transform of the turned,
//       transposed kernels, whose conv of the output gradient is the input gradient
//   fastbb_C::winograd_conv2d(x, u, shift?, residual?, relu, pad_h, pad_w, dilation_h, dilation_w)
//       -> out = relu?(conv3x3(x) + shift [+ residual]), (N, K, H_out, W_out), H_out = H + 2 pad_h - 2 dilation_h
//       (the tile from u's size: 16 or 36)
//   fastbb_C::winograd_weight_gradient(x, grad_y, pad_h, pad_w, dilation_h, dilation_w, tile) -> grad_u
//   fastbb_C::winograd_weight_backward(grad_u) -> grad_weight (K, C, 3, 3), the transform's adjoint
//
// A 3x3 stride-1 conv computes each m x m output tile from an a x a input patch. With the patch transformed
// (V = B^T d B) and the weight transformed (u = G g G^T, done once per weight), the conv becomes a*a
// independent GEMMs M[ab] = u[ab] (K x C) @ V[ab] (C x T) over the T tiles: per tile and channel pair a*a
// multiplies instead of 9 m*m, 2.25x fewer for F(2x2) and 4x fewer for F(4x4). The output is A^T M A per
// tile, plus the BN shift, the residual and the ReLU in the same pass. The GEMMs are ATen's bmm (MKL on x86).
// F(4x4) interpolates at 0, 1, -1, 2, -2 (and infinity): its float32 error is about 30x a direct conv's (F(2x2):
// 1.2-1.6x), which training tolerates and the eval path, compared with oneDNN to a few roundings, does not.
//
// Dilation d (F(2x2) only): outputs x and x + d share inputs x + {0, d, 2d, 3d}, so a tile covers the outputs
// {oy, oy + dy} x {ox, ox + dx} and its patch rows/columns are d apart. Tile origins along a dimension are
// the positions o with o mod md < d: each output is then in exactly one tile.
//
// Tiles are numbered (n, tile row, tile column). x, residual and the output are contiguous NCHW float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "cpu_simd.h"

namespace fastbb {
namespace {

// Threads get at least this many tile-channel pairs each: below it, starting them costs more than it saves.
constexpr int64_t kMinTilesPerThread = 2048;

// The tile origins along one output dimension of `size` with dilation d and tiles of m outputs: every o with
// o mod md < d.
std::vector<int64_t> tile_origins(int64_t size, int64_t d, int64_t m) {
  std::vector<int64_t> origins;
  for (int64_t o = 0; o < size; ++o) {
    if (o % (m * d) < d) origins.push_back(o);
  }
  return origins;
}

// V (16, C, T) of one (n, c, tile row): the 4 patch rows are copied (zero padded) into `rows`, combined
// down the columns into E = B^T D, and then each tile's 4 columns of E are combined across: V = E B.
FASTBB_AVX2_CLONES
void input_transform_row(const float* plane, int64_t H, int64_t W, int64_t pad_h, int64_t pad_w, int64_t dh,
                         int64_t dw, int64_t oy, const int64_t* origins_x, int64_t TX, float* rows, int64_t width,
                         float* v, int64_t stride_a) {
  float* d[4];
  for (int i = 0; i < 4; ++i) {
    d[i] = rows + i * width;
    const int64_t iy = oy - pad_h + i * dh;
    std::fill(d[i], d[i] + width, 0.0f);
    if (iy < 0 || iy >= H) continue;
    // Buffer column j holds input column j - pad_w.
    const int64_t begin = std::max<int64_t>(0, pad_w), end = std::min<int64_t>(width, W + pad_w);
    if (end > begin) std::copy(plane + iy * W + (begin - pad_w), plane + iy * W + (end - pad_w), d[i] + begin);
  }
  // E = B^T D, in place: row 0 = d0 - d2, row 1 = d1 + d2, row 2 = d2 - d1, row 3 = d1 - d3.
  for (int64_t j = 0; j < width; ++j) {
    const float d0 = d[0][j], d1 = d[1][j], d2 = d[2][j], d3 = d[3][j];
    d[0][j] = d0 - d2;
    d[1][j] = d1 + d2;
    d[2][j] = d2 - d1;
    d[3][j] = d1 - d3;
  }
  for (int a = 0; a < 4; ++a) {
    const float* e = d[a];
    float* v0 = v + (4 * a) * stride_a;
    float* v1 = v0 + stride_a;
    float* v2 = v1 + stride_a;
    float* v3 = v2 + stride_a;
    for (int64_t t = 0; t < TX; ++t) {
      const int64_t ox = origins_x[t];
      const float e0 = e[ox], e1 = e[ox + dw], e2 = e[ox + 2 * dw], e3 = e[ox + 3 * dw];
      v0[t] = e0 - e2;
      v1[t] = e1 + e2;
      v2[t] = e2 - e1;
      v3[t] = e1 - e3;
    }
  }
}

// The epilogue of both tile sizes: rows_out output rows from the row buffers (width apart) into out
// (out_row_stride apart), plus shift (and residual), then ReLU.
FASTBB_AVX2_CLONES
void write_output_rows(const float* rows, int64_t width, int64_t Wo, int64_t rows_out, float shift,
                       const float* residual, int64_t out_row_stride, bool relu, float* out) {
  for (int64_t a = 0; a < rows_out; ++a) {
    const float* r = rows + a * width;
    float* o = out + a * out_row_stride;
    const float* res = residual == nullptr ? nullptr : residual + a * out_row_stride;
    for (int64_t j = 0; j < Wo; ++j) {
      float value = r[j] + shift;
      if (res != nullptr) value += res[j];
      o[j] = relu ? std::max(value, 0.0f) : value;
    }
  }
}

// The outputs of one (n, k, tile row): y = A^T m A per tile into two row buffers, then write_output_rows.
FASTBB_AVX2_CLONES
void output_transform_row(const float* m, int64_t stride_a, const int64_t* origins_x, int64_t TX, int64_t dw,
                          float* rows, int64_t width, int64_t Wo, int64_t rows_out, float shift,
                          const float* residual, int64_t out_row_stride, bool relu, float* out) {
  float* r0 = rows;
  float* r1 = rows + width;
  for (int64_t t = 0; t < TX; ++t) {
    float s[2][4];
    for (int b = 0; b < 4; ++b) {
      const float m0 = m[(0 + b) * stride_a + t], m1 = m[(4 + b) * stride_a + t];
      const float m2 = m[(8 + b) * stride_a + t], m3 = m[(12 + b) * stride_a + t];
      s[0][b] = m0 + m1 + m2;
      s[1][b] = m1 - m2 - m3;
    }
    const int64_t ox = origins_x[t];
    r0[ox] = s[0][0] + s[0][1] + s[0][2];
    r0[ox + dw] = s[0][1] - s[0][2] - s[0][3];
    r1[ox] = s[1][0] + s[1][1] + s[1][2];
    r1[ox + dw] = s[1][1] - s[1][2] - s[1][3];
  }
  write_output_rows(rows, width, Wo, rows_out, shift, residual, out_row_stride, relu, out);
}

// grad_M = A grad_y A^T of each tile of one (n, k, tile row), the adjoint of output_transform_row: the
// tile's outputs {oy, oy + dh} x {ox, ox + dw} (0 where outside the output) into 16 planes of stride_a.
FASTBB_AVX2_CLONES
void output_gradient_transform_row(const float* grad_plane, int64_t Ho, int64_t Wo, int64_t oy, int64_t dh,
                                   const int64_t* origins_x, int64_t TX, int64_t dw, float* rows, int64_t width,
                                   float* gm, int64_t stride_a) {
  for (int i = 0; i < 2; ++i) {
    float* row = rows + i * width;
    std::fill(row, row + width, 0.0f);
    if (oy + i * dh < Ho) std::copy(grad_plane + (oy + i * dh) * Wo, grad_plane + (oy + i * dh + 1) * Wo, row);
  }
  const float* g0 = rows;
  const float* g1 = rows + width;
  for (int64_t t = 0; t < TX; ++t) {
    const int64_t ox = origins_x[t];
    // r = A g: rows g0, g0 + g1, g0 - g1, -g1, for both columns.
    const float r[4][2] = {{g0[ox], g0[ox + dw]},
                           {g0[ox] + g1[ox], g0[ox + dw] + g1[ox + dw]},
                           {g0[ox] - g1[ox], g0[ox + dw] - g1[ox + dw]},
                           {-g1[ox], -g1[ox + dw]}};
    for (int a = 0; a < 4; ++a) {  // r A^T: columns r0, r0 + r1, r0 - r1, -r1
      float* out = gm + (4 * a) * stride_a + t;
      out[0] = r[a][0];
      out[stride_a] = r[a][0] + r[a][1];
      out[2 * stride_a] = r[a][0] - r[a][1];
      out[3 * stride_a] = -r[a][1];
    }
  }
}

// F(4x4, 3x3), dilation 1: the same three row passes with 6x6 patches and 4x4 tiles.
//   B^T rows: (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
//             (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)
//   A^T rows: (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)
//   G rows:   (1/4, 0, 0), (-1/6, -1/6, -1/6), (-1/6, 1/6, -1/6), (1/24, 1/12, 1/6), (1/24, -1/12, 1/6), (0, 0, 1)

// e = B^T d for six values d.
inline void f4_input_combine(const float d[6], float e[6]) {
  e[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
  e[1] = (d[3] + d[4]) - 4.0f * (d[1] + d[2]);
  e[2] = (d[4] - d[3]) + 4.0f * (d[1] - d[2]);
  e[3] = (d[4] - d[2]) + 2.0f * (d[3] - d[1]);
  e[4] = (d[4] - d[2]) - 2.0f * (d[3] - d[1]);
  e[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

// y = A^T m for six values m.
inline void f4_output_combine(const float m[6], float y[4]) {
  const float p12 = m[1] + m[2], m12 = m[1] - m[2], p34 = m[3] + m[4], m34 = m[3] - m[4];
  y[0] = m[0] + p12 + p34;
  y[1] = m12 + 2.0f * m34;
  y[2] = p12 + 4.0f * p34;
  y[3] = m12 + 8.0f * m34 + m[5];
}

// r = A g for four values g (the adjoint of f4_output_combine).
inline void f4_gradient_combine(const float g[4], float r[6]) {
  const float p02 = g[0] + g[2], p13 = g[1] + g[3], q02 = g[0] + 4.0f * g[2], q13 = 2.0f * g[1] + 8.0f * g[3];
  r[0] = g[0];
  r[1] = p02 + p13;
  r[2] = p02 - p13;
  r[3] = q02 + q13;
  r[4] = q02 - q13;
  r[5] = g[3];
}

// V (36, C, T) of one (n, c, tile row): the 6 patch rows copied (zero padded) into `rows`, combined down the
// columns (E = B^T D, in place), then each tile's 6 columns of E combined across (V = E B).
FASTBB_AVX2_CLONES
void f4_input_transform_row(const float* plane, int64_t H, int64_t W, int64_t pad_h, int64_t pad_w, int64_t,
                            int64_t, int64_t oy, const int64_t* origins_x, int64_t TX, float* rows, int64_t width,
                            float* v, int64_t stride_a) {
  float* d[6];
  for (int i = 0; i < 6; ++i) {
    d[i] = rows + i * width;
    const int64_t iy = oy - pad_h + i;
    std::fill(d[i], d[i] + width, 0.0f);
    if (iy < 0 || iy >= H) continue;
    const int64_t begin = std::max<int64_t>(0, pad_w), end = std::min<int64_t>(width, W + pad_w);
    if (end > begin) std::copy(plane + iy * W + (begin - pad_w), plane + iy * W + (end - pad_w), d[i] + begin);
  }
  for (int64_t j = 0; j < width; ++j) {
    const float in[6] = {d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]};
    float e[6];
    f4_input_combine(in, e);
    for (int i = 0; i < 6; ++i) d[i][j] = e[i];
  }
  for (int a = 0; a < 6; ++a) {
    const float* e = d[a];
    float* va = v + (6 * a) * stride_a;
    for (int64_t t = 0; t < TX; ++t) {
      const float* patch = e + origins_x[t];
      float out[6];
      f4_input_combine(patch, out);
      for (int b = 0; b < 6; ++b) va[b * stride_a + t] = out[b];
    }
  }
}

// The outputs of one (n, k, tile row): y = A^T m A per tile into four row buffers, then write_output_rows.
FASTBB_AVX2_CLONES
void f4_output_transform_row(const float* m, int64_t stride_a, const int64_t* origins_x, int64_t TX, int64_t,
                             float* rows, int64_t width, int64_t Wo, int64_t rows_out, float shift,
                             const float* residual, int64_t out_row_stride, bool relu, float* out) {
  for (int64_t t = 0; t < TX; ++t) {
    float s[4][6];  // A^T m, column by column
    for (int b = 0; b < 6; ++b) {
      const float column[6] = {m[b * stride_a + t],        m[(6 + b) * stride_a + t],  m[(12 + b) * stride_a + t],
                               m[(18 + b) * stride_a + t], m[(24 + b) * stride_a + t], m[(30 + b) * stride_a + t]};
      float y[4];
      f4_output_combine(column, y);
      for (int i = 0; i < 4; ++i) s[i][b] = y[i];
    }
    const int64_t ox = origins_x[t];
    for (int i = 0; i < 4; ++i) f4_output_combine(s[i], rows + i * width + ox);
  }
  write_output_rows(rows, width, Wo, rows_out, shift, residual, out_row_stride, relu, out);
}

// grad_M = A grad_y A^T of each tile of one (n, k, tile row), the adjoint of f4_output_transform_row.
FASTBB_AVX2_CLONES
void f4_output_gradient_transform_row(const float* grad_plane, int64_t Ho, int64_t Wo, int64_t oy, int64_t,
                                      const int64_t* origins_x, int64_t TX, int64_t, float* rows, int64_t width,
                                      float* gm, int64_t stride_a) {
  for (int i = 0; i < 4; ++i) {
    float* row = rows + i * width;
    std::fill(row, row + width, 0.0f);
    if (oy + i < Ho) std::copy(grad_plane + (oy + i) * Wo, grad_plane + (oy + i + 1) * Wo, row);
  }
  for (int64_t t = 0; t < TX; ++t) {
    const int64_t ox = origins_x[t];
    float r[6][4];  // A g, column by column
    for (int j = 0; j < 4; ++j) {
      const float column[4] = {rows[ox + j], rows[width + ox + j], rows[2 * width + ox + j],
                               rows[3 * width + ox + j]};
      float out[6];
      f4_gradient_combine(column, out);
      for (int a = 0; a < 6; ++a) r[a][j] = out[a];
    }
    for (int a = 0; a < 6; ++a) {  // r A^T
      float out[6];
      f4_gradient_combine(r[a], out);
      for (int b = 0; b < 6; ++b) gm[(6 * a + b) * stride_a + t] = out[b];
    }
  }
}

// d = B v B^T: the adjoint of f4_input_combine (B^T's columns) for six values v.
inline void f4_input_adjoint_combine(const float v[6], float d[6]) {
  d[0] = 4.0f * v[0];
  d[1] = 4.0f * (v[2] - v[1] + v[5]) + 2.0f * (v[4] - v[3]);
  d[2] = -5.0f * v[0] - 4.0f * (v[1] + v[2]) - (v[3] + v[4]);
  d[3] = (v[1] - v[2]) + 2.0f * (v[3] - v[4]) - 5.0f * v[5];
  d[4] = v[0] + v[1] + v[2] + v[3] + v[4];
  d[5] = v[5];
}

// The input gradient of one (n, c, tile row) from grad_V (36 planes of stride_a), the adjoint of
// f4_input_transform_row: each tile's B grad_V B^T (its 6x6 patch's gradient) summed into six row buffers
// (neighbouring patches overlap by two columns), then the rows inside the input added to grad_plane (the
// patches of neighbouring tile rows overlap by two rows: the caller runs a plane's tile rows in order).
FASTBB_AVX2_CLONES
void f4_input_gradient_row(const float* gv, int64_t stride_a, const int64_t* origins_x, int64_t TX, float* rows,
                           int64_t width, float* grad_plane, int64_t H, int64_t W, int64_t pad_h, int64_t pad_w,
                           int64_t oy) {
  std::fill(rows, rows + 6 * width, 0.0f);
  for (int64_t t = 0; t < TX; ++t) {
    float s[6][6];  // grad_V B^T, row by row
    for (int a = 0; a < 6; ++a) {
      const float row[6] = {gv[(6 * a) * stride_a + t],     gv[(6 * a + 1) * stride_a + t],
                            gv[(6 * a + 2) * stride_a + t], gv[(6 * a + 3) * stride_a + t],
                            gv[(6 * a + 4) * stride_a + t], gv[(6 * a + 5) * stride_a + t]};
      f4_input_adjoint_combine(row, s[a]);
    }
    const int64_t ox = origins_x[t];
    for (int j = 0; j < 6; ++j) {  // B (grad_V B^T), column by column
      const float column[6] = {s[0][j], s[1][j], s[2][j], s[3][j], s[4][j], s[5][j]};
      float d[6];
      f4_input_adjoint_combine(column, d);
      for (int i = 0; i < 6; ++i) rows[i * width + ox + j] += d[i];
    }
  }
  // Buffer column j is input column j - pad_w.
  const int64_t begin = std::max<int64_t>(0, pad_w), end = std::min<int64_t>(width, W + pad_w);
  for (int i = 0; i < 6; ++i) {
    const int64_t iy = oy - pad_h + i;
    if (iy < 0 || iy >= H) continue;
    const float* r = rows + i * width;
    float* g = grad_plane + iy * W - pad_w;
    for (int64_t j = begin; j < end; ++j) g[j] += r[j];
  }
}

// The two tile sizes: m outputs per tile side, a = m + 2 inputs, the kernel transform G (a x 3) and the row
// passes above.
struct WinogradF2 {
  static constexpr int kM = 2, kAlpha = 4;
  static constexpr double kG[4][3] = {{1.0, 0.0, 0.0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0.0, 0.0, 1.0}};
  static constexpr auto input_row = input_transform_row;
  static constexpr auto output_row = output_transform_row;
  static constexpr auto output_gradient_row = output_gradient_transform_row;
};

struct WinogradF4 {
  static constexpr int kM = 4, kAlpha = 6;
  static constexpr double kG[6][3] = {{1.0 / 4, 0.0, 0.0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                      {-1.0 / 6, 1.0 / 6, -1.0 / 6},  {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                      {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0.0, 0.0, 1.0}};
  static constexpr auto input_row = f4_input_transform_row;
  static constexpr auto output_row = f4_output_transform_row;
  static constexpr auto output_gradient_row = f4_output_gradient_transform_row;
};

// Kernels are transformed in blocks of this many, each step a loop over the block's kernels (vectorized):
// their taps are gathered into a local buffer, and the block's transforms are written (or read) as a*a
// contiguous runs.
constexpr int64_t kWeightBlock = 256;

// u = G g G^T of each 3x3 kernel g, as (a*a, P, Q), computed in float64 and rounded once. For the conv
// itself (P, Q) = (K, C) and g = weight[k][c]; for the conv that gives its input gradient (P, Q) = (C, K) and
// g = weight[k][c] turned by 180 degrees.
template <typename Tile>
at::Tensor weight_transform(const at::Tensor& weight, bool of_input_gradient) {
  constexpr int kA = Tile::kAlpha;
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "fastbb.winograd_weight: weight must be a contiguous (K, C, 3, 3) float32 tensor");
  const int64_t K = weight.size(0), C = weight.size(1), plane = K * C;
  const int64_t Q = of_input_gradient ? K : C;
  at::Tensor u = at::empty({kA * kA, of_input_gradient ? C : K, Q}, weight.options());
  const float* wp = weight.const_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  at::parallel_for(0, (plane + kWeightBlock - 1) / kWeightBlock, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> taps(9 * kWeightBlock), t(kA * 3 * kWeightBlock);
    std::vector<float> block(kA * kA * kWeightBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * kWeightBlock, count = std::min(kWeightBlock, plane - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t p = (first + i) / Q, q = (first + i) % Q;
        const float* g = wp + (of_input_gradient ? q * C + p : p * C + q) * 9;
        for (int j = 0; j < 9; ++j) taps[j * kWeightBlock + i] = g[of_input_gradient ? 8 - j : j];  // turned: 8 - j
      }
      for (int a = 0; a < kA; ++a) {  // t = G g
        for (int j = 0; j < 3; ++j) {
          double* out = t.data() + (3 * a + j) * kWeightBlock;
          const double* g0 = taps.data() + j * kWeightBlock;
          const double* g1 = g0 + 3 * kWeightBlock;
          const double* g2 = g0 + 6 * kWeightBlock;
          for (int64_t i = 0; i < count; ++i) out[i] = Tile::kG[a][0] * g0[i] + Tile::kG[a][1] * g1[i] + Tile::kG[a][2] * g2[i];
        }
      }
      for (int a = 0; a < kA; ++a) {  // u = t G^T
        const double* t0 = t.data() + 3 * a * kWeightBlock;
        const double* t1 = t0 + kWeightBlock;
        const double* t2 = t1 + kWeightBlock;
        for (int b = 0; b < kA; ++b) {
          float* out = up + (kA * a + b) * plane + first;
          for (int64_t i = 0; i < count; ++i) {
            out[i] = static_cast<float>(t0[i] * Tile::kG[b][0] + t1[i] * Tile::kG[b][1] + t2[i] * Tile::kG[b][2]);
          }
        }
      }
    }
  });
  return u;
}

at::Tensor winograd_weight_cpu(const at::Tensor& weight, int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, "fastbb.winograd_weight: tile must be 2 or 4, got ", tile);
  return tile == 2 ? weight_transform<WinogradF2>(weight, false) : weight_transform<WinogradF4>(weight, false);
}

at::Tensor winograd_weight_of_input_gradient_cpu(const at::Tensor& weight, int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, "fastbb.winograd_weight_of_input_gradient: tile must be 2 or 4, got ", tile);
  return tile == 2 ? weight_transform<WinogradF2>(weight, true) : weight_transform<WinogradF4>(weight, true);
}

// The weight's gradient (K, C, 3, 3) from grad_u (a*a, K, C), the gradient with respect to its transform:
// G^T grad_u G per kernel, the adjoint of winograd_weight, in grad_u's dtype.
template <typename Tile, typename scalar_t>
void weight_transform_backward(const scalar_t* gup, int64_t plane, scalar_t* gwp) {
  constexpr int kA = Tile::kAlpha;
  at::parallel_for(0, (plane + kWeightBlock - 1) / kWeightBlock, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> t(3 * kA * kWeightBlock), taps(9 * kWeightBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * kWeightBlock, count = std::min(kWeightBlock, plane - first);
      for (int j = 0; j < 3; ++j) {  // t = G^T X, row j: sum over a of G[a][j] X[a][b]
        for (int b = 0; b < kA; ++b) {
          scalar_t* out = t.data() + (kA * j + b) * kWeightBlock;
          std::fill(out, out + count, scalar_t(0));
          for (int a = 0; a < kA; ++a) {
            const scalar_t coefficient = scalar_t(Tile::kG[a][j]);
            if (coefficient == scalar_t(0)) continue;
            const scalar_t* x = gup + (kA * a + b) * plane + first;
            for (int64_t i = 0; i < count; ++i) out[i] += coefficient * x[i];
          }
        }
      }
      for (int j = 0; j < 3; ++j) {  // (G^T X) G
        for (int l = 0; l < 3; ++l) {
          scalar_t* out = taps.data() + (3 * j + l) * kWeightBlock;
          std::fill(out, out + count, scalar_t(0));
          for (int b = 0; b < kA; ++b) {
            const scalar_t coefficient = scalar_t(Tile::kG[b][l]);
            if (coefficient == scalar_t(0)) continue;
            const scalar_t* x = t.data() + (kA * j + b) * kWeightBlock;
            for (int64_t i = 0; i < count; ++i) out[i] += coefficient * x[i];
          }
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        for (int tap = 0; tap < 9; ++tap) gwp[(first + i) * 9 + tap] = taps[tap * kWeightBlock + i];
      }
    }
  });
}

at::Tensor winograd_weight_backward_cpu(const at::Tensor& grad_u) {
  TORCH_CHECK(grad_u.dim() == 3 && (grad_u.size(0) == 16 || grad_u.size(0) == 36) && grad_u.is_contiguous() &&
                  (grad_u.scalar_type() == at::kFloat || grad_u.scalar_type() == at::kDouble),
              "fastbb.winograd_weight_backward: grad_u must be a contiguous (16 or 36, K, C) float32 or float64 "
              "tensor");
  const int64_t K = grad_u.size(1), C = grad_u.size(2);
  at::Tensor grad_w = at::empty({K, C, 3, 3}, grad_u.options());
  AT_DISPATCH_FLOATING_TYPES(grad_u.scalar_type(), "winograd_weight_backward", [&] {
    if (grad_u.size(0) == 16) {
      weight_transform_backward<WinogradF2>(grad_u.const_data_ptr<scalar_t>(), K * C, grad_w.mutable_data_ptr<scalar_t>());
    } else {
      weight_transform_backward<WinogradF4>(grad_u.const_data_ptr<scalar_t>(), K * C, grad_w.mutable_data_ptr<scalar_t>());
    }
  });
  return grad_w;
}

// The tiles are processed in chunks of whole tile rows whose V and M together take about kChunkBytes, so
// that they stay in cache from their transform to the GEMM and from the GEMM to the output transform
// (all at once, a 2x800x1344 backbone's V and M reach hundreds of MB and every pass goes through
// memory). A chunk has at least kMinChunkTiles tiles: every chunk's GEMM reads all of U, and with fewer
// columns that read costs more than the chunk's arithmetic.
constexpr int64_t kChunkBytes = int64_t{2} << 20;
constexpr int64_t kMinChunkTiles = 128;

// The m x m tiles of a conv's output (N, K, Ho, Wo): origins along each dimension, and chunks of whole tile
// rows.
template <typename Tile>
struct Tiling {
  std::vector<int64_t> origins_y, origins_x;
  int64_t TY, TX, rows_total, rows_per_chunk;

  Tiling(int64_t N, int64_t Ho, int64_t Wo, int64_t dh, int64_t dw, int64_t C, int64_t K)
      : origins_y(tile_origins(Ho, dh, Tile::kM)), origins_x(tile_origins(Wo, dw, Tile::kM)) {
    TY = origins_y.size();
    TX = origins_x.size();
    rows_total = N * TY;
    const int64_t bytes_per_row =
        Tile::kAlpha * Tile::kAlpha * (C + K) * TX * static_cast<int64_t>(sizeof(float));
    rows_per_chunk = std::min(rows_total,
                              std::max({int64_t{1}, kChunkBytes / bytes_per_row, (kMinChunkTiles + TX - 1) / TX}));
  }
};

// Runs body(begin, end) over [0, n): spread over the threads (at least `grain` items each) when `parallel`,
// else on this thread.
template <typename Body>
void for_items(bool parallel, int64_t n, int64_t grain, const Body& body) {
  if (parallel) {
    at::parallel_for(0, n, grain, body);
  } else if (n > 0) {
    body(0, n);
  }
}

// V of the tile rows [row0, row0 + rows) of x (N, C, H, W) into v, a compact (a*a, C, rows * TX).
template <typename Tile>
void input_transform_chunk(const float* xp, int64_t C, int64_t H, int64_t W, int64_t pad_h, int64_t pad_w, int64_t dh,
                           int64_t dw, const Tiling<Tile>& tiling, int64_t row0, int64_t rows, float* vp,
                           bool parallel = true) {
  const int64_t TX = tiling.TX, TY = tiling.TY, tiles = rows * TX;
  // the last tile reads up to its origin + (a - 1) d
  const int64_t width = (tiling.origins_x.back() + 1) + (Tile::kAlpha - 1) * dw;
  for_items(parallel, C * rows, std::max<int64_t>(1, kMinTilesPerThread / TX), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(Tile::kAlpha * width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / rows, row = row0 + item % rows, n = row / TY, ty = row % TY;
      Tile::input_row(xp + (n * C + c) * H * W, H, W, pad_h, pad_w, dh, dw, tiling.origins_y[ty],
                          tiling.origins_x.data(), TX, buffer.data(), width, vp + c * tiles + (row - row0) * TX,
                          C * tiles);
    }
  });
}

template <typename Tile>
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& shift,
                  const std::optional<at::Tensor>& residual, bool relu, int64_t pad_h, int64_t pad_w, int64_t dh,
                  int64_t dw) {
  constexpr int64_t kA2 = Tile::kAlpha * Tile::kAlpha;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = u.size(1);
  const float* sp = nullptr;
  if (shift.has_value()) {
    TORCH_CHECK(shift->dim() == 1 && shift->size(0) == K && shift->scalar_type() == at::kFloat &&
                    shift->is_contiguous(),
                "fastbb.winograd_conv2d: shift must be a contiguous (K,) float32 tensor");
    sp = shift->const_data_ptr<float>();
  }
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && dh >= 1 && dw >= 1 && (Tile::kM == 2 || (dh == 1 && dw == 1)),
              "fastbb.winograd_conv2d: bad padding or dilation (F(4x4) takes dilation 1 only)");
  const int64_t Ho = H + 2 * pad_h - 2 * dh, Wo = W + 2 * pad_w - 2 * dw;
  TORCH_CHECK(Ho > 0 && Wo > 0, "fastbb.winograd_conv2d: the output would be empty");
  const float* res = nullptr;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.scalar_type() == at::kFloat && r.is_contiguous() && r.dim() == 4 && r.size(0) == N &&
                    r.size(1) == K && r.size(2) == Ho && r.size(3) == Wo,
                "fastbb.winograd_conv2d: residual must be a contiguous float32 tensor of the output's shape");
    res = r.const_data_ptr<float>();
  }
  at::Tensor out = at::empty({N, K, Ho, Wo}, x.options());
  if (N == 0 || K == 0) return out;
  const Tiling<Tile> tiling(N, Ho, Wo, dh, dw, C, K);
  const std::vector<int64_t>& origins_y = tiling.origins_y;
  const std::vector<int64_t>& origins_x = tiling.origins_x;
  const int64_t TY = tiling.TY, TX = tiling.TX;
  float* op = out.mutable_data_ptr<float>();
  const int64_t out_width = Wo + (Tile::kM - 1) * dw;  // the last tile writes its origin + (m - 1) d
  const int64_t num_chunks = (tiling.rows_total + tiling.rows_per_chunk - 1) / tiling.rows_per_chunk;

  // One chunk of tile rows: input transform, the a*a GEMMs, output transform with the epilogue. Every
  // output element belongs to one chunk, so the result does not depend on which thread ran which chunk.
  // v and m: flat buffers whose start is viewed as compact (a*a, C, tiles) and (a*a, K, tiles) matrices.
  auto run_chunk = [&](int64_t chunk, float* vp, float* mp, bool parallel) {
    const int64_t row0 = chunk * tiling.rows_per_chunk;
    const int64_t rows = std::min(tiling.rows_per_chunk, tiling.rows_total - row0), tiles = rows * TX;
    input_transform_chunk(x.const_data_ptr<float>(), C, H, W, pad_h, pad_w, dh, dw, tiling, row0, rows, vp, parallel);
    at::Tensor v_chunk = at::from_blob(vp, {kA2, C, tiles}, x.options());
    at::Tensor m_chunk = at::from_blob(mp, {kA2, K, tiles}, x.options());
    at::bmm_out(m_chunk, u, v_chunk);  // on one thread inside a parallel region
    for_items(parallel, K * rows, std::max<int64_t>(1, kMinTilesPerThread / TX), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(Tile::kM * out_width);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / rows, row = row0 + item % rows, n = row / TY, ty = row % TY;
        const int64_t oy = origins_y[ty];
        const int64_t rows_out = std::min<int64_t>(Tile::kM, (Ho - 1 - oy) / dh + 1);
        // Rows oy, oy + dh, ... of the output plane (n, k), dh * Wo apart.
        const int64_t offset = ((n * K + k) * Ho + oy) * Wo;
        Tile::output_row(mp + k * tiles + (row - row0) * TX, K * tiles, origins_x.data(), TX, dw, buffer.data(),
                             out_width, Wo, rows_out, sp == nullptr ? 0.0f : sp[k],
                             res == nullptr ? nullptr : res + offset, dh * Wo, relu, op + offset);
      }
    });
  };
  const int64_t chunk_floats = kA2 * (C + K) * tiling.rows_per_chunk * TX;
  const int threads = at::get_num_threads();
  if (threads > 1 && num_chunks >= 2 * threads && !at::in_parallel_region()) {
    // Enough chunks to go round: one parallel region in which each thread takes the next chunk whole, with
    // its own buffers. On a CPU shared with other processes (DataLoader workers), a descheduled thread then
    // delays only the chunk it holds while the others take the rest; with each chunk's three stages run in
    // parallel, every stage of every chunk would wait for it at its barrier (measured: 2.5-3.7x slower
    // with one busy process beside it, against 1.7-2x for oneDNN's conv).
    std::atomic<int64_t> next_chunk{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      const std::unique_ptr<float[]> buffer(new float[chunk_floats]);  // uninitialised: every value is written
      for (int64_t chunk = next_chunk++; chunk < num_chunks; chunk = next_chunk++) {
        run_chunk(chunk, buffer.get(), buffer.get() + kA2 * C * tiling.rows_per_chunk * TX, false);
      }
    });
  } else {
    // Few chunks: each one's stages spread over the threads.
    const std::unique_ptr<float[]> buffer(new float[chunk_floats]);
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      run_chunk(chunk, buffer.get(), buffer.get() + kA2 * C * tiling.rows_per_chunk * TX, true);
    }
  }
  return out;
}

at::Tensor winograd_conv2d_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& residual, bool relu, int64_t pad_h, int64_t pad_w,
                               int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "fastbb.winograd_conv2d: x must be a contiguous NCHW float32 tensor");
  TORCH_CHECK(u.dim() == 3 && (u.size(0) == 16 || u.size(0) == 36) && u.size(2) == x.size(1) &&
                  u.scalar_type() == at::kFloat && u.is_contiguous(),
              "fastbb.winograd_conv2d: u must be a contiguous (16 or 36, K, C) float32 tensor with C = ", x.size(1));
  return u.size(0) == 16 ? conv2d<WinogradF2>(x, u, shift, residual, relu, pad_h, pad_w, dh, dw)
                         : conv2d<WinogradF4>(x, u, shift, residual, relu, pad_h, pad_w, dh, dw);
}

// grad_u (a*a, K, C): the gradient of the loss with respect to u = winograd_weight(weight, m) of the conv of
// x whose output gradient is grad_y, summed over the tiles chunk by chunk: grad_u[ab] += grad_M[ab] V[ab]^T.
// The weight's gradient is then G^T grad_u G per kernel (winograd_weight_backward).
// With u (F(4x4) only) also the input gradient, chunk by chunk from the same grad_M: grad_V[ab] = u[ab]^T
// grad_M[ab], then B grad_V B^T per tile added into grad_x (f4_input_gradient_row); without, grad_x is
// undefined.
template <typename Tile>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor* u,
                                            int64_t pad_h, int64_t pad_w, int64_t dh, int64_t dw) {
  constexpr int64_t kA2 = Tile::kAlpha * Tile::kAlpha;
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "fastbb.winograd_weight_gradient: x must be a contiguous NCHW float32 tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && dh >= 1 && dw >= 1 && (Tile::kM == 2 || (dh == 1 && dw == 1)),
              "fastbb.winograd_weight_gradient: bad padding or dilation (F(4x4) takes dilation 1 only)");
  const int64_t Ho = H + 2 * pad_h - 2 * dh, Wo = W + 2 * pad_w - 2 * dw;
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.scalar_type() == at::kFloat && grad_y.is_contiguous() &&
                  grad_y.size(0) == N && grad_y.size(2) == Ho && grad_y.size(3) == Wo && Ho > 0 && Wo > 0,
              "fastbb.winograd_weight_gradient: grad_y must be a contiguous float32 (N, K, H_out, W_out) tensor");
  const int64_t K = grad_y.size(1);
  at::Tensor grad_x;
  if (u != nullptr) {
    TORCH_CHECK(Tile::kM == 4 && u->dim() == 3 && u->size(0) == kA2 && u->size(1) == K && u->size(2) == C &&
                    u->scalar_type() == at::kFloat && u->is_contiguous(),
                "fastbb.winograd_backward: u must be a contiguous (36, K, C) float32 tensor");
    grad_x = at::zeros_like(x);
  }
  if (N == 0 || K == 0 || C == 0) return {grad_x, at::zeros({kA2, K, C}, x.options())};
  at::Tensor grad_u = at::empty({kA2, K, C}, x.options());  // the first chunk's product, then the others added
  const Tiling<Tile> tiling(N, Ho, Wo, dh, dw, C, K);
  const int64_t TY = tiling.TY, TX = tiling.TX;
  at::Tensor v = at::empty({kA2 * C * tiling.rows_per_chunk * TX}, x.options());
  at::Tensor gm = at::empty({kA2 * K * tiling.rows_per_chunk * TX}, x.options());
  const float* gp = grad_y.const_data_ptr<float>();
  const int64_t width = Wo + (Tile::kM - 1) * dw;  // the last tile reads its origin + (m - 1) d
  for (int64_t row0 = 0; row0 < tiling.rows_total; row0 += tiling.rows_per_chunk) {
    const int64_t rows = std::min(tiling.rows_per_chunk, tiling.rows_total - row0), tiles = rows * TX;
    input_transform_chunk(x.const_data_ptr<float>(), C, H, W, pad_h, pad_w, dh, dw, tiling, row0, rows,
                          v.mutable_data_ptr<float>());
    float* gmp = gm.mutable_data_ptr<float>();
    at::parallel_for(0, K * rows, std::max<int64_t>(1, kMinTilesPerThread / TX), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(Tile::kM * width);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / rows, row = row0 + item % rows, n = row / TY, ty = row % TY;
        Tile::output_gradient_row(gp + (n * K + k) * Ho * Wo, Ho, Wo, tiling.origins_y[ty], dh,
                                      tiling.origins_x.data(), TX, dw, buffer.data(), width,
                                      gmp + k * tiles + (row - row0) * TX, K * tiles);
      }
    });
    at::Tensor v_chunk = v.narrow(0, 0, kA2 * C * tiles).view({kA2, C, tiles});
    at::Tensor gm_chunk = gm.narrow(0, 0, kA2 * K * tiles).view({kA2, K, tiles});
    if (row0 == 0) {
      at::bmm_out(grad_u, gm_chunk, v_chunk.transpose(1, 2));
    } else {
      grad_u.baddbmm_(gm_chunk, v_chunk.transpose(1, 2));
    }
    if constexpr (Tile::kM == 4) {
      if (u == nullptr) continue;
      at::bmm_out(v_chunk, u->transpose(1, 2), gm_chunk);  // grad_V, over V (no longer needed)
      const float* gvp = v.const_data_ptr<float>();
      float* gxp = grad_x.mutable_data_ptr<float>();
      const int64_t in_width = (tiling.origins_x.back() + 1) + (Tile::kAlpha - 1);
      // By channel: each plane's tile rows in order, as their patches overlap.
      at::parallel_for(0, C, std::max<int64_t>(1, kMinTilesPerThread / tiles), [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(Tile::kAlpha * in_width);
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t row = row0; row < row0 + rows; ++row) {
            const int64_t n = row / TY, ty = row % TY;
            f4_input_gradient_row(gvp + c * tiles + (row - row0) * TX, C * tiles, tiling.origins_x.data(), TX,
                                  buffer.data(), in_width, gxp + (n * C + c) * H * W, H, W, pad_h, pad_w,
                                  tiling.origins_y[ty]);
          }
        }
      });
    }
  }
  return {grad_x, grad_u};
}

at::Tensor winograd_weight_gradient_cpu(const at::Tensor& x, const at::Tensor& grad_y, int64_t pad_h, int64_t pad_w,
                                        int64_t dh, int64_t dw, int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, "fastbb.winograd_weight_gradient: tile must be 2 or 4, got ", tile);
  return std::get<1>(tile == 2 ? backward<WinogradF2>(x, grad_y, nullptr, pad_h, pad_w, dh, dw)
                                : backward<WinogradF4>(x, grad_y, nullptr, pad_h, pad_w, dh, dw));
}

std::tuple<at::Tensor, at::Tensor> winograd_backward_cpu(const at::Tensor& x, const at::Tensor& grad_y,
                                                         const at::Tensor& u, int64_t pad_h, int64_t pad_w) {
  return backward<WinogradF4>(x, grad_y, &u, pad_h, pad_w, 1, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("winograd_weight_of_input_gradient", &winograd_weight_of_input_gradient_cpu);
  m.impl("winograd_weight_backward", &winograd_weight_backward_cpu);
  m.impl("winograd_conv2d", &winograd_conv2d_cpu);
  m.impl("winograd_weight_gradient", &winograd_weight_gradient_cpu);
  m.impl("winograd_backward", &winograd_backward_cpu);
}

}  // namespace fastbb
