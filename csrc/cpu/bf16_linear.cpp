// AVX512-BF16 kernels of the CPU query's bf16 layers (bf16_linear.h). The extension is built for any
// x86-64 CPU: these functions alone are compiled for AVX512-BF16 and are only called after the
// run-time check in native_available().
#include "bf16_linear.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

// GCC knows AVX512-BF16 from version 10, Clang from 9; older compilers build the float32 fallback.
#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define LIIF_BF16_KERNELS 1
#include <immintrin.h>
#define LIIF_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define LIIF_BF16_KERNELS 0
#endif

namespace liif {
namespace cpu {
namespace bf16 {

namespace {

// float32 -> bf16 bits, round to nearest even (NaN stays NaN), as torch's conversion and the
// rounding model do; used where the weights are packed, off the hot path.
uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

bool native_available() {
  const char* env = std::getenv("LIIF_CUDA_CPU_BF16");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
#if LIIF_BF16_KERNELS
  // The GCC/Clang CPU model checks the OS's support of the AVX-512 register state too.
  static const bool supported = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

PackedLayer pack_layer(const float* weight, const float* bias, int64_t out, int64_t in) {
  PackedLayer layer;
  layer.in = in;
  layer.out = out;
  layer.out_pitch = activation_pitch(out);
  const int64_t pairs = (in + 1) / 2;
  layer.weight.assign(pairs * layer.out_pitch * 2, 0);
  layer.bias.assign(layer.out_pitch, 0.0f);
  for (int64_t n = 0; n < out; ++n) {
    for (int64_t k = 0; k < in; ++k) {
      layer.weight[((k / 2) * layer.out_pitch + n) * 2 + k % 2] = to_bf16(weight[n * in + k]);
    }
    layer.bias[n] = bias[n];
  }
  return layer;
}

#if LIIF_BF16_KERNELS

// GCC 12's AVX-512 intrinsics start from `_mm512_undefined_*()`, a self-initialised variable that
// -Wmaybe-uninitialized reports once they are inlined (a false positive, GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

// Rows of a block: 8 rows x 32 columns are 16 accumulators, plus 2 weight vectors and a broadcast,
// within the 32 vector registers; each step of the inner loop issues 16 dot products for 10 loads.
constexpr int kBlockRows = 8;

// acc[r][h] += sum_p a[r][p] . w[p][16h .. 16h + 15] for `rows` (<= kBlockRows) rows and one block
// of 32 columns, whose packed weights start at w (pairs `out_pitch` apart).
template <int rows>
LIIF_TARGET_BF16 inline void accumulate_block(__m512 (&acc)[rows][2], const uint16_t* a,
                                              int64_t row_stride, int64_t pair_stride,
                                              int64_t pairs, const uint16_t* w,
                                              int64_t out_pitch) {
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = w + p * out_pitch * 2;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * row_stride + p * pair_stride, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
    }
  }
}

// The first min(left, 16) of 16 columns (none for left <= 0): the mask of a row's last columns.
LIIF_TARGET_BF16 inline __mmask16 column_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// 16 columns of a row as bf16, zero outside `mask`: float32 rounded to nearest even, or bf16 as is.
LIIF_TARGET_BF16 inline __m256i load_as_bf16(__mmask16 mask, const float* src) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src));
}
LIIF_TARGET_BF16 inline __m256i load_as_bf16(__mmask16 mask, const uint16_t* src) {
  return _mm256_maskz_loadu_epi16(mask, src);
}

// 16 bf16 values widened to float32 (exact: the 16 bits become the float's high half).
LIIF_TARGET_BF16 inline __m512 load_bf16x16(const uint16_t* src) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
}

// `rows` (<= kBlockRows) rows x 32 columns of a layer's output: bias, ReLU, rounded to bf16.
template <int rows>
LIIF_TARGET_BF16 inline void linear_block(const uint16_t* a, int64_t a_pitch, int64_t pairs,
                                          const uint16_t* w, int64_t out_pitch, const float* bias,
                                          bool relu, uint16_t* dst, int64_t dst_pitch) {
  __m512 acc[rows][2];
  const __m512 bias0 = _mm512_loadu_ps(bias), bias1 = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
    acc[r][0] = bias0;
    acc[r][1] = bias1;
  }
  accumulate_block<rows>(acc, a, a_pitch, 2, pairs, w, out_pitch);
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < 2; ++h) {
      __m512 v = acc[r][h];
      // `v < 0 ? 0 : v` keeps NaN, as torch.relu does (max_ps would not).
      if (relu) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * dst_pitch + 16 * h),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// `rows` (<= kBlockRows) rows x 32 columns of a float32 product (product_float).
template <int rows>
LIIF_TARGET_BF16 inline void product_block(PairRows a, int64_t pairs, const uint16_t* w,
                                           int64_t n_pitch, bool accumulate,
                                           const uint16_t* mask, int64_t mask_pitch, float* dst,
                                           int64_t dst_pitch) {
  __m512 acc[rows][2];
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < 2; ++h) {
      acc[r][h] = accumulate ? _mm512_loadu_ps(dst + r * dst_pitch + 16 * h) : _mm512_setzero_ps();
    }
  }
  accumulate_block<rows>(acc, a.data, a.row_stride, a.pair_stride, pairs, w, n_pitch);
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < 2; ++h) {
      __m512 v = acc[r][h];
      if (mask != nullptr) {
        // Zero where mask <= 0 and kept elsewhere (NaN included), as threshold_backward.
        const __m512 m = load_bf16x16(mask + r * mask_pitch + 16 * h);
        v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, zero, _CMP_NLE_UQ), v);
      }
      _mm512_storeu_ps(dst + r * dst_pitch + 16 * h, v);
    }
  }
}

template <int rows>
LIIF_TARGET_BF16 void product_rows(PairRows a, int64_t pairs, const uint16_t* b, int64_t n_pitch,
                                   bool accumulate, const uint16_t* mask, int64_t mask_pitch,
                                   float* dst, int64_t dst_pitch) {
  for (int64_t n = 0; n < n_pitch; n += 32) {
    product_block<rows>(a, pairs, b + 2 * n, n_pitch, accumulate,
                        mask != nullptr ? mask + n : nullptr, mask_pitch, dst + n, dst_pitch);
  }
}

template <int rows>
LIIF_TARGET_BF16 void linear_rows(const uint16_t* a, int64_t a_pitch, const PackedLayer& layer,
                                  bool relu, uint16_t* dst) {
  const int64_t pairs = (layer.in + 1) / 2;
  for (int64_t n = 0; n < layer.out_pitch; n += 32) {
    linear_block<rows>(a, a_pitch, pairs, layer.weight.data() + 2 * n, layer.out_pitch,
                       layer.bias.data() + n, relu, dst + n, layer.out_pitch);
  }
}

}  // namespace

LIIF_TARGET_BF16 void round_rows(const float* src, int64_t src_pitch, int64_t rows, int64_t width,
                                 uint16_t* dst) {
  const int64_t pitch = activation_pitch(width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * src_pitch;
    uint16_t* d = dst + r * pitch;
    for (int64_t c = 0; c < pitch; c += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c),
                          load_as_bf16(column_mask(width - c), s + c));
    }
  }
}

LIIF_TARGET_BF16 void linear(const uint16_t* a, int64_t rows, const PackedLayer& layer, bool relu,
                             uint16_t* dst) {
  const int64_t a_pitch = activation_pitch(layer.in);
  int64_t r = 0;
  // Column blocks inside row blocks: a block's 8 input rows stay in L1 across the columns, and the
  // packed weights (128 KiB for 256 x 256) in L2.
  for (; r + kBlockRows <= rows; r += kBlockRows) {
    linear_rows<kBlockRows>(a + r * a_pitch, a_pitch, layer, relu, dst + r * layer.out_pitch);
  }
  const uint16_t* a_tail = a + r * a_pitch;
  uint16_t* d_tail = dst + r * layer.out_pitch;
  switch (rows - r) {
    case 1: linear_rows<1>(a_tail, a_pitch, layer, relu, d_tail); break;
    case 2: linear_rows<2>(a_tail, a_pitch, layer, relu, d_tail); break;
    case 3: linear_rows<3>(a_tail, a_pitch, layer, relu, d_tail); break;
    case 4: linear_rows<4>(a_tail, a_pitch, layer, relu, d_tail); break;
    case 5: linear_rows<5>(a_tail, a_pitch, layer, relu, d_tail); break;
    case 6: linear_rows<6>(a_tail, a_pitch, layer, relu, d_tail); break;
    case 7: linear_rows<7>(a_tail, a_pitch, layer, relu, d_tail); break;
    default: break;
  }
}

LIIF_TARGET_BF16 void linear_float_out(const uint16_t* a, int64_t rows, int64_t in,
                                       const float* weight, const float* bias, int64_t out_dim,
                                       float* out) {
  const int64_t pitch = activation_pitch(in);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = a + r * pitch;
    for (int64_t o = 0; o < out_dim; ++o) {
      const float* w = weight + o * in;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < in; c += 16) {
        const __mmask16 mask = column_mask(in - c);
        const __m512 x = load_bf16x16(row + c);
        acc = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(mask, w + c), acc);
      }
      out[r * out_dim + o] = _mm512_reduce_add_ps(acc) + bias[o];
    }
  }
}

LIIF_TARGET_BF16 void product_float(PairRows a, int64_t rows, int64_t pairs, const uint16_t* b,
                                    int64_t n_pitch, bool accumulate, const uint16_t* mask,
                                    int64_t mask_pitch, float* dst, int64_t dst_pitch) {
  TORCH_CHECK(n_pitch % 32 == 0, "liif_cuda: bf16 product of ", n_pitch, " columns");
  int64_t r = 0;
  for (; r + kBlockRows <= rows; r += kBlockRows) {
    product_rows<kBlockRows>({a.data + r * a.row_stride, a.row_stride, a.pair_stride}, pairs, b,
                             n_pitch, accumulate, mask != nullptr ? mask + r * mask_pitch : nullptr,
                             mask_pitch, dst + r * dst_pitch, dst_pitch);
  }
  const PairRows tail{a.data + r * a.row_stride, a.row_stride, a.pair_stride};
  const uint16_t* mask_tail = mask != nullptr ? mask + r * mask_pitch : nullptr;
  float* d = dst + r * dst_pitch;
  switch (rows - r) {
#define LIIF_PRODUCT_TAIL(n)                                                                  \
  case n:                                                                                     \
    product_rows<n>(tail, pairs, b, n_pitch, accumulate, mask_tail, mask_pitch, d, dst_pitch); \
    break;
    LIIF_PRODUCT_TAIL(1)
    LIIF_PRODUCT_TAIL(2)
    LIIF_PRODUCT_TAIL(3)
    LIIF_PRODUCT_TAIL(4)
    LIIF_PRODUCT_TAIL(5)
    LIIF_PRODUCT_TAIL(6)
    LIIF_PRODUCT_TAIL(7)
#undef LIIF_PRODUCT_TAIL
    default: break;
  }
}

namespace {

// Rows 2p and 2p + 1 of src (float32 or bf16) interleaved into pairs (pack_row_pairs).
template <typename T>
LIIF_TARGET_BF16 void pack_pairs(const T* src, int64_t src_pitch, int64_t rows, int64_t width,
                                 uint16_t* dst) {
  const int64_t pitch = activation_pitch(width);
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const T* r0 = src + 2 * p * src_pitch;
    const T* r1 = 2 * p + 1 < rows ? r0 + src_pitch : nullptr;
    for (int64_t c = 0; c < pitch; c += 16) {
      const __mmask16 m = column_mask(width - c);
      // 16 columns of the two rows, interleaved into 16 pairs (one 512-bit store).
      const __m512i lo = _mm512_cvtepu16_epi32(load_as_bf16(m, r0 + c));
      const __m512i hi = _mm512_cvtepu16_epi32(r1 != nullptr ? load_as_bf16(m, r1 + c)
                                                             : _mm256_setzero_si256());
      _mm512_storeu_si512(dst + (p * pitch + c) * 2,
                          _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

}  // namespace

LIIF_TARGET_BF16 void pack_row_pairs(const float* src, int64_t src_pitch, int64_t rows,
                                     int64_t width, uint16_t* dst) {
  pack_pairs(src, src_pitch, rows, width, dst);
}

LIIF_TARGET_BF16 void pack_row_pairs(const uint16_t* src, int64_t src_pitch, int64_t rows,
                                     int64_t width, uint16_t* dst) {
  pack_pairs(src, src_pitch, rows, width, dst);
}

LIIF_TARGET_BF16 void widen_rows(const uint16_t* src, int64_t src_pitch, int64_t rows,
                                 int64_t width, float* dst, int64_t dst_pitch) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; c += 16) {
      const __mmask16 m = column_mask(width - c);
      const __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + r * src_pitch + c));
      _mm512_mask_storeu_ps(dst + r * dst_pitch + c, m,
                            _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#else  // no AVX512-BF16 kernels in this build: native_available() is false, nothing calls these.

void round_rows(const float*, int64_t, int64_t, int64_t, uint16_t*) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}
void linear(const uint16_t*, int64_t, const PackedLayer&, bool, uint16_t*) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}
void linear_float_out(const uint16_t*, int64_t, int64_t, const float*, const float*, int64_t,
                      float*) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}
void pack_row_pairs(const float*, int64_t, int64_t, int64_t, uint16_t*) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}
void pack_row_pairs(const uint16_t*, int64_t, int64_t, int64_t, uint16_t*) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}
void product_float(PairRows, int64_t, int64_t, const uint16_t*, int64_t, bool, const uint16_t*,
                   int64_t, float*, int64_t) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}
void widen_rows(const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "liif_cuda: the CPU bf16 kernels are not built for this architecture");
}

#endif

}  // namespace bf16
}  // namespace cpu
}  // namespace liif
