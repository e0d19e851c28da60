// The bf16 layers of the CPU query (precision "bf16"): hidden layers as bf16 x bf16 products with
// float32 accumulation on the processor's bf16 dot-product units (AVX512-BF16), in the rounding model
// of the CUDA tensor-core kernel (python/liif_rounding_model.py): operands rounded to bf16 once per
// layer (round to nearest even), float32 accumulation, bias and ReLU in float32, the result rounded
// once; the last layer in float32 on the rounded activations.
//
// Activations are bf16 rows (stored as their 16 bits) with a pitch of activation_pitch(width)
// elements; the columns past the width are zero, so a layer can read its inputs in pairs.
#pragma once

#include <cstdint>
#include <vector>

namespace liif {
namespace cpu {
namespace bf16 {

// Whether the bf16 kernels run here: an x86-64 build and a CPU with AVX512-BF16, unless the
// environment variable LIIF_CUDA_CPU_BF16 is "0" (read on each call: it lets the tests, and users
// comparing, force the float32 fallback). Elsewhere precision "bf16" computes float32 on the CPU.
bool native_available();

// The pitch of a bf16 activation row of `width` columns: a whole number of 32-column blocks.
inline int64_t activation_pitch(int64_t width) { return (width + 31) / 32 * 32; }

// One hidden layer's weight (out, in) in the order the kernel reads it: for each pair of input
// columns (k, k + 1), the out_pitch output columns' two bf16 values side by side; the bias in
// float32. Both padded with zeros to out_pitch = activation_pitch(out) columns.
struct PackedLayer {
  int64_t in = 0, out = 0, out_pitch = 0;
  std::vector<uint16_t> weight;  // (ceil(in / 2), out_pitch, 2)
  std::vector<float> bias;       // (out_pitch)
};

PackedLayer pack_layer(const float* weight, const float* bias, int64_t out, int64_t in);

// float32 rows (pitch src_pitch) to bf16 rows (pitch activation_pitch(width)), zero beyond width.
void round_rows(const float* src, int64_t src_pitch, int64_t rows, int64_t width, uint16_t* dst);

// dst = bf16(relu?(a @ W^T + bias)) for `rows` rows of a (pitch activation_pitch(layer.in)) into dst
// (pitch layer.out_pitch; the padding columns come out zero).
void linear(const uint16_t* a, int64_t rows, const PackedLayer& layer, bool relu, uint16_t* dst);

// The last layer in float32: out (rows, out_dim, contiguous) = a @ weight^T + bias, where a holds
// bf16 rows (pitch activation_pitch(in)) and weight is float32 (out_dim, in).
void linear_float_out(const uint16_t* a, int64_t rows, int64_t in, const float* weight,
                      const float* bias, int64_t out_dim, float* out);

// The backward's bf16 mode: products of bf16 operands with float32 accumulation and float32
// results. An operand is given as rows of bf16 pairs: pair p (elements 2p and 2p + 1 of the
// reduction) of row r at data + r * row_stride + p * pair_stride, two values side by side. bf16
// activation rows (pitch P) are {data, P, 2}; a matrix packed by pack_row_pairs is, read as its
// transpose, {data, 2, 2 * activation_pitch(width)}.
struct PairRows {
  const uint16_t* data;
  int64_t row_stride, pair_stride;
};

// Rows 2p and 2p + 1 of a (rows x width) matrix interleaved, the layout of a packed weight:
// dst[(p * pitch + c) * 2 + j] = src[2p + j][c] for pitch = activation_pitch(width), zero past
// `rows` and `width`; ceil(rows / 2) * pitch * 2 values. From float32 rows (rounded to bf16, to
// nearest even) or from bf16 rows.
void pack_row_pairs(const float* src, int64_t src_pitch, int64_t rows, int64_t width,
                    uint16_t* dst);
void pack_row_pairs(const uint16_t* src, int64_t src_pitch, int64_t rows, int64_t width,
                    uint16_t* dst);

// dst[r][n] = (accumulate ? dst[r][n] : 0) + sum_p a[r][p] . b[p][n] for r < rows and the
// n_pitch columns of b, a packed weight ({pairs, n_pitch, 2} bf16, n_pitch a multiple of 32), in
// float32; with `mask` (bf16 rows of pitch mask_pitch), zero where mask[r][n] <= 0 (the ReLU's
// derivative as torch's threshold_backward computes it: a NaN activation passes the gradient).
void product_float(PairRows a, int64_t rows, int64_t pairs, const uint16_t* b, int64_t n_pitch,
                   bool accumulate, const uint16_t* mask, int64_t mask_pitch, float* dst,
                   int64_t dst_pitch);

// bf16 rows (pitch src_pitch) to float32 rows (pitch dst_pitch), `width` columns; exact.
void widen_rows(const uint16_t* src, int64_t src_pitch, int64_t rows, int64_t width, float* dst,
                int64_t dst_pitch);

}  // namespace bf16
}  // namespace cpu
}  // namespace liif
