// Winograd F(2x2, 3x3) conv of conv_bn_relu's CPU convs, eval and training (schemas in
// fastbb/ops/conv_bn_relu/cpu_conv.py):
//   fastbb_C::winograd_weight(weight) -> u (16, K, C)
//   fastbb_C::winograd_weight_of_input_gradient(weight) -> (16, C, K), the transform of the turned,
//       transposed kernels, whose conv of the output gradient is the input gradient
//   fastbb_C::winograd_conv2d(x, u, shift?, residual?, relu, pad_h, pad_w, dilation_h, dilation_w)
//       -> out = relu?(conv3x3(x) + shift [+ residual]), (N, K, H_out, W_out), H_out = H + 2 pad_h - 2 dilation_h
//   fastbb_C::winograd_weight_gradient(x, grad_y, pad_h, pad_w, dilation_h, dilation_w) -> grad_u (16, K, C)
//   fastbb_C::winograd_weight_backward(grad_u) -> grad_weight (K, C, 3, 3), the transform's adjoint
//
// A 3x3 stride-1 conv computes each 2x2 output tile from a 4x4 input patch. With the patch transformed
// (V = B^T d B) and the weight transformed (u = G g G^T, done once per folded weight), the conv becomes 16
// independent GEMMs M[a] = u[a] (K x C) @ V[a] (C x T) over the T tiles, with 16 multiplies per tile
// and channel pair instead of 36: 2.25x fewer. The output is A^T M A per tile, plus the BN shift, the
// residual and the ReLU in the same pass. The GEMMs are ATen's bmm (MKL on x86).
//
// Dilation d: outputs x and x + d share inputs x + {0, d, 2d, 3d}, so a tile covers the outputs
// {oy, oy + dy} x {ox, ox + dx} and its patch rows/columns are d apart. Tile origins along a dimension are
// the positions o with o mod 2d < d: each output is then in exactly one tile.
//
// Tiles are numbered (n, tile row, tile column). x, residual and the output are contiguous NCHW float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_simd.h"

namespace fastbb {
namespace {

// Threads get at least this many tile-channel pairs each: below it, starting them costs more than it saves.
constexpr int64_t kMinTilesPerThread = 2048;

// The tile origins along one output dimension of `size` with dilation d: every o with o mod 2d < d.
std::vector<int64_t> tile_origins(int64_t size, int64_t d) {
  std::vector<int64_t> origins;
  for (int64_t o = 0; o < size; ++o) {
    if (o % (2 * d) < d) origins.push_back(o);
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

// The outputs of one (n, k, tile row): y = A^T m A per tile into two row buffers, then shift, residual and
// ReLU row by row into out.
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

// Kernels are transformed in blocks of this many into a local buffer that is then written (or read) as 16
// contiguous runs: going straight between each kernel's 16 values and the 16 planes of u is several times
// slower.
constexpr int64_t kWeightBlock = 256;

// u = G g G^T of each 3x3 kernel g, as (16, P, Q), computed in float64 and rounded once. For the conv itself
// (P, Q) = (K, C) and g = weight[k][c]; for the conv that gives its input gradient (P, Q) = (C, K) and
// g = weight[k][c] turned by 180 degrees.
at::Tensor weight_transform(const at::Tensor& weight, bool of_input_gradient) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "fastbb.winograd_weight: weight must be a contiguous (K, C, 3, 3) float32 tensor");
  const int64_t K = weight.size(0), C = weight.size(1), plane = K * C;
  const int64_t Q = of_input_gradient ? K : C;
  at::Tensor u = at::empty({16, of_input_gradient ? C : K, Q}, weight.options());
  const float* wp = weight.const_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  at::parallel_for(0, (plane + kWeightBlock - 1) / kWeightBlock, 16, [&](int64_t begin, int64_t end) {
    float block[16][kWeightBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * kWeightBlock, count = std::min(kWeightBlock, plane - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t p = (first + i) / Q, q = (first + i) % Q;
        const float* g = wp + (of_input_gradient ? q * C + p : p * C + q) * 9;
        // g[8 - index] is the turned kernel's g[index]
        auto tap = [&](int index) { return static_cast<double>(g[of_input_gradient ? 8 - index : index]); };
        double t[4][3];  // G g
        for (int j = 0; j < 3; ++j) {
          const double g0 = tap(j), g1 = tap(3 + j), g2 = tap(6 + j);
          t[0][j] = g0;
          t[1][j] = 0.5 * (g0 + g1 + g2);
          t[2][j] = 0.5 * (g0 - g1 + g2);
          t[3][j] = g2;
        }
        for (int a = 0; a < 4; ++a) {  // (G g) G^T
          block[4 * a][i] = static_cast<float>(t[a][0]);
          block[4 * a + 1][i] = static_cast<float>(0.5 * (t[a][0] + t[a][1] + t[a][2]));
          block[4 * a + 2][i] = static_cast<float>(0.5 * (t[a][0] - t[a][1] + t[a][2]));
          block[4 * a + 3][i] = static_cast<float>(t[a][2]);
        }
      }
      for (int ab = 0; ab < 16; ++ab) std::copy(block[ab], block[ab] + count, up + ab * plane + first);
    }
  });
  return u;
}

at::Tensor winograd_weight_cpu(const at::Tensor& weight) { return weight_transform(weight, false); }

at::Tensor winograd_weight_of_input_gradient_cpu(const at::Tensor& weight) { return weight_transform(weight, true); }

// The weight's gradient (K, C, 3, 3) from grad_u (16, K, C), the gradient with respect to its transform:
// G^T grad_u G per kernel, the adjoint of winograd_weight, in grad_u's dtype.
template <typename scalar_t>
void weight_transform_backward(const scalar_t* gup, int64_t plane, scalar_t* gwp) {
  at::parallel_for(0, (plane + kWeightBlock - 1) / kWeightBlock, 16, [&](int64_t begin, int64_t end) {
    scalar_t block[16][kWeightBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * kWeightBlock, count = std::min(kWeightBlock, plane - first);
      for (int ab = 0; ab < 16; ++ab) std::copy(gup + ab * plane + first, gup + ab * plane + first + count, block[ab]);
      for (int64_t i = 0; i < count; ++i) {
        scalar_t t[3][4];  // G^T X: rows x0 + (x1 + x2) / 2, (x1 - x2) / 2, (x1 + x2) / 2 + x3
        for (int b = 0; b < 4; ++b) {
          const scalar_t x0 = block[b][i], x1 = block[4 + b][i], x2 = block[8 + b][i], x3 = block[12 + b][i];
          t[0][b] = x0 + scalar_t(0.5) * (x1 + x2);
          t[1][b] = scalar_t(0.5) * (x1 - x2);
          t[2][b] = scalar_t(0.5) * (x1 + x2) + x3;
        }
        scalar_t* g = gwp + (first + i) * 9;
        for (int a = 0; a < 3; ++a) {  // (G^T X) G: the same combination along the columns
          g[3 * a] = t[a][0] + scalar_t(0.5) * (t[a][1] + t[a][2]);
          g[3 * a + 1] = scalar_t(0.5) * (t[a][1] - t[a][2]);
          g[3 * a + 2] = scalar_t(0.5) * (t[a][1] + t[a][2]) + t[a][3];
        }
      }
    }
  });
}

at::Tensor winograd_weight_backward_cpu(const at::Tensor& grad_u) {
  TORCH_CHECK(grad_u.dim() == 3 && grad_u.size(0) == 16 && grad_u.is_contiguous() &&
                  (grad_u.scalar_type() == at::kFloat || grad_u.scalar_type() == at::kDouble),
              "fastbb.winograd_weight_backward: grad_u must be a contiguous (16, K, C) float32 or float64 tensor");
  const int64_t K = grad_u.size(1), C = grad_u.size(2);
  at::Tensor grad_w = at::empty({K, C, 3, 3}, grad_u.options());
  AT_DISPATCH_FLOATING_TYPES(grad_u.scalar_type(), "winograd_weight_backward", [&] {
    weight_transform_backward(grad_u.const_data_ptr<scalar_t>(), K * C, grad_w.mutable_data_ptr<scalar_t>());
  });
  return grad_w;
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

// The tiles are processed in chunks of whole tile rows whose V and M together take about kChunkBytes, so
// that they stay in cache from their transform to the GEMM and from the GEMM to the output transform
// (all at once, a 2x800x1344 backbone's V and M reach hundreds of MB and every pass goes through
// memory). A chunk has at least kMinChunkTiles tiles: every chunk's GEMM reads all of U, and with fewer
// columns that read costs more than the chunk's arithmetic.
constexpr int64_t kChunkBytes = int64_t{2} << 20;
constexpr int64_t kMinChunkTiles = 128;

// The tiles of a conv's output (N, K, Ho, Wo): origins along each dimension, and chunks of whole tile rows.
struct Tiling {
  std::vector<int64_t> origins_y, origins_x;
  int64_t TY, TX, rows_total, rows_per_chunk;

  Tiling(int64_t N, int64_t Ho, int64_t Wo, int64_t dh, int64_t dw, int64_t C, int64_t K)
      : origins_y(tile_origins(Ho, dh)), origins_x(tile_origins(Wo, dw)) {
    TY = origins_y.size();
    TX = origins_x.size();
    rows_total = N * TY;
    const int64_t bytes_per_row = 16 * (C + K) * TX * static_cast<int64_t>(sizeof(float));
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

// V of the tile rows [row0, row0 + rows) of x (N, C, H, W) into v, a compact (16, C, rows * TX).
void input_transform_chunk(const float* xp, int64_t C, int64_t H, int64_t W, int64_t pad_h, int64_t pad_w, int64_t dh,
                           int64_t dw, const Tiling& tiling, int64_t row0, int64_t rows, float* vp,
                           bool parallel = true) {
  const int64_t TX = tiling.TX, TY = tiling.TY, tiles = rows * TX;
  const int64_t width = (tiling.origins_x.back() + 1) + 3 * dw;  // the last tile reads up to its origin + 3 dw
  for_items(parallel, C * rows, std::max<int64_t>(1, kMinTilesPerThread / TX), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(4 * width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / rows, row = row0 + item % rows, n = row / TY, ty = row % TY;
      input_transform_row(xp + (n * C + c) * H * W, H, W, pad_h, pad_w, dh, dw, tiling.origins_y[ty],
                          tiling.origins_x.data(), TX, buffer.data(), width, vp + c * tiles + (row - row0) * TX,
                          C * tiles);
    }
  });
}

at::Tensor winograd_conv2d_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& residual, bool relu, int64_t pad_h, int64_t pad_w,
                               int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "fastbb.winograd_conv2d: x must be a contiguous NCHW float32 tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(u.dim() == 3 && u.size(0) == 16 && u.size(2) == C && u.scalar_type() == at::kFloat && u.is_contiguous(),
              "fastbb.winograd_conv2d: u must be a contiguous (16, K, C) float32 tensor with C = ", C);
  const int64_t K = u.size(1);
  const float* sp = nullptr;
  if (shift.has_value()) {
    TORCH_CHECK(shift->dim() == 1 && shift->size(0) == K && shift->scalar_type() == at::kFloat &&
                    shift->is_contiguous(),
                "fastbb.winograd_conv2d: shift must be a contiguous (K,) float32 tensor");
    sp = shift->const_data_ptr<float>();
  }
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && dh >= 1 && dw >= 1, "fastbb.winograd_conv2d: bad padding or dilation");
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
  const Tiling tiling(N, Ho, Wo, dh, dw, C, K);
  const std::vector<int64_t>& origins_y = tiling.origins_y;
  const std::vector<int64_t>& origins_x = tiling.origins_x;
  const int64_t TY = tiling.TY, TX = tiling.TX;
  float* op = out.mutable_data_ptr<float>();
  const int64_t out_width = Wo + dw;  // the last tile writes its origin + dw
  const int64_t num_chunks = (tiling.rows_total + tiling.rows_per_chunk - 1) / tiling.rows_per_chunk;

  // One chunk of tile rows: input transform, the 16 GEMMs, output transform with the epilogue. Every
  // output element belongs to one chunk, so the result does not depend on which thread ran which chunk.
  // v and m: flat buffers whose start is viewed as compact (16, C, tiles) and (16, K, tiles) matrices.
  auto run_chunk = [&](int64_t chunk, float* vp, float* mp, bool parallel) {
    const int64_t row0 = chunk * tiling.rows_per_chunk;
    const int64_t rows = std::min(tiling.rows_per_chunk, tiling.rows_total - row0), tiles = rows * TX;
    input_transform_chunk(x.const_data_ptr<float>(), C, H, W, pad_h, pad_w, dh, dw, tiling, row0, rows, vp, parallel);
    at::Tensor v_chunk = at::from_blob(vp, {16, C, tiles}, x.options());
    at::Tensor m_chunk = at::from_blob(mp, {16, K, tiles}, x.options());
    at::bmm_out(m_chunk, u, v_chunk);  // on one thread inside a parallel region
    for_items(parallel, K * rows, std::max<int64_t>(1, kMinTilesPerThread / TX), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(2 * out_width);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / rows, row = row0 + item % rows, n = row / TY, ty = row % TY;
        const int64_t oy = origins_y[ty];
        const int64_t rows_out = oy + dh < Ho ? 2 : 1;
        // Rows oy and oy + dh of the output plane (n, k), dh * Wo apart.
        const int64_t offset = ((n * K + k) * Ho + oy) * Wo;
        output_transform_row(mp + k * tiles + (row - row0) * TX, K * tiles, origins_x.data(), TX, dw, buffer.data(),
                             out_width, Wo, rows_out, sp == nullptr ? 0.0f : sp[k],
                             res == nullptr ? nullptr : res + offset, dh * Wo, relu, op + offset);
      }
    });
  };
  const int64_t chunk_floats = 16 * (C + K) * tiling.rows_per_chunk * TX;
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
        run_chunk(chunk, buffer.get(), buffer.get() + 16 * C * tiling.rows_per_chunk * TX, false);
      }
    });
  } else {
    // Few chunks: each one's stages spread over the threads.
    const std::unique_ptr<float[]> buffer(new float[chunk_floats]);
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      run_chunk(chunk, buffer.get(), buffer.get() + 16 * C * tiling.rows_per_chunk * TX, true);
    }
  }
  return out;
}

// grad_u (16, K, C): the gradient of the loss with respect to u = winograd_weight(weight) of the conv of x
// whose output gradient is grad_y, summed over the tiles chunk by chunk: grad_u[a] += grad_M[a] V[a]^T.
// The weight's gradient is then G^T grad_u G per kernel (in fastbb/ops/conv_bn_relu/cpu_conv.py).
at::Tensor winograd_weight_gradient_cpu(const at::Tensor& x, const at::Tensor& grad_y, int64_t pad_h, int64_t pad_w,
                                        int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "fastbb.winograd_weight_gradient: x must be a contiguous NCHW float32 tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && dh >= 1 && dw >= 1,
              "fastbb.winograd_weight_gradient: bad padding or dilation");
  const int64_t Ho = H + 2 * pad_h - 2 * dh, Wo = W + 2 * pad_w - 2 * dw;
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.scalar_type() == at::kFloat && grad_y.is_contiguous() &&
                  grad_y.size(0) == N && grad_y.size(2) == Ho && grad_y.size(3) == Wo && Ho > 0 && Wo > 0,
              "fastbb.winograd_weight_gradient: grad_y must be a contiguous float32 (N, K, H_out, W_out) tensor");
  const int64_t K = grad_y.size(1);
  if (N == 0 || K == 0 || C == 0) return at::zeros({16, K, C}, x.options());
  at::Tensor grad_u = at::empty({16, K, C}, x.options());  // the first chunk's product, then the others added
  const Tiling tiling(N, Ho, Wo, dh, dw, C, K);
  const int64_t TY = tiling.TY, TX = tiling.TX;
  at::Tensor v = at::empty({16 * C * tiling.rows_per_chunk * TX}, x.options());
  at::Tensor gm = at::empty({16 * K * tiling.rows_per_chunk * TX}, x.options());
  const float* gp = grad_y.const_data_ptr<float>();
  const int64_t width = Wo + dw;  // the last tile reads its origin + dw
  for (int64_t row0 = 0; row0 < tiling.rows_total; row0 += tiling.rows_per_chunk) {
    const int64_t rows = std::min(tiling.rows_per_chunk, tiling.rows_total - row0), tiles = rows * TX;
    input_transform_chunk(x.const_data_ptr<float>(), C, H, W, pad_h, pad_w, dh, dw, tiling, row0, rows,
                          v.mutable_data_ptr<float>());
    float* gmp = gm.mutable_data_ptr<float>();
    at::parallel_for(0, K * rows, std::max<int64_t>(1, kMinTilesPerThread / TX), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(2 * width);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / rows, row = row0 + item % rows, n = row / TY, ty = row % TY;
        output_gradient_transform_row(gp + (n * K + k) * Ho * Wo, Ho, Wo, tiling.origins_y[ty], dh,
                                      tiling.origins_x.data(), TX, dw, buffer.data(), width,
                                      gmp + k * tiles + (row - row0) * TX, K * tiles);
      }
    });
    at::Tensor v_chunk = v.narrow(0, 0, 16 * C * tiles).view({16, C, tiles});
    at::Tensor gm_chunk = gm.narrow(0, 0, 16 * K * tiles).view({16, K, tiles});
    if (row0 == 0) {
      at::bmm_out(grad_u, gm_chunk, v_chunk.transpose(1, 2));
    } else {
      grad_u.baddbmm_(gm_chunk, v_chunk.transpose(1, 2));
    }
  }
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbb_C, CPU, m) {
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("winograd_weight_of_input_gradient", &winograd_weight_of_input_gradient_cpu);
  m.impl("winograd_weight_backward", &winograd_weight_backward_cpu);
  m.impl("winograd_conv2d", &winograd_conv2d_cpu);
  m.impl("winograd_weight_gradient", &winograd_weight_gradient_cpu);
}

}  // namespace fastbb
