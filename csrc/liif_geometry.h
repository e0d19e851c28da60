// Per-query geometry of the LIIF query, shared by the CPU and CUDA kernels.
//
// For one query coordinate this computes, for each of the (up to) four neighbours of the local ensemble,
// the LR cell that nearest sampling picks, the relative coordinate fed to the MLP, and the blend weight.
// Every constant and every rounding step follows the reference (python/liif_reference.py, spec section 2),
// because a single differently rounded index changes an output pixel completely:
//   - the Python scalars of the reference (shift `v*r + eps`, clamp bounds, make_coord's first centre and
//     step, 1e-9) are rounded once to the arithmetic type on the host (FeatureGrid below);
//   - every per-query operation is an individually rounded IEEE operation; on the device the `_rn`
//     intrinsics keep nvcc from contracting a multiply and an add into an FMA, and host code is compiled
//     with -ffp-contract=off for the same reason;
//   - except one: the source index of nearest sampling, which torch's grid_sample computes with a
//     fused multiply-add where its compiled code has one (FeatureGrid::fused_index, nearest_index()).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LIIF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LIIF_HOST_DEVICE inline
#endif

// A loop the device compiler keeps rolled (see visit_neighbours); host compilers get nothing, as
// GCC warns about the pragma.
#if defined(__CUDA_ARCH__)
#define LIIF_DEVICE_NO_UNROLL _Pragma("unroll 1")
#else
#define LIIF_DEVICE_NO_UNROLL
#endif

namespace liif {

constexpr int kMaxNeighbours = 4;

// Exactly rounded arithmetic, never contracted into an FMA.
LIIF_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LIIF_HOST_DEVICE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
LIIF_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LIIF_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
// a * b + c with a single rounding.
LIIF_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
LIIF_HOST_DEVICE double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Round half to even, as std::nearbyint in grid_sample's nearest mode (default rounding mode).
LIIF_HOST_DEVICE float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}
LIIF_HOST_DEVICE double round_half_even(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);
#endif
}

LIIF_HOST_DEVICE float abs_value(float v) { return fabsf(v); }
LIIF_HOST_DEVICE double abs_value(double v) { return fabs(v); }

template <typename T>
LIIF_HOST_DEVICE bool is_finite(T v) {
  // v - v is 0 for finite v and NaN for +-inf and NaN; written out so fast-math cannot fold it.
  return (v - v) == T(0);
}

// Constants of the sampling grid of one (H, W) feature map, in the arithmetic type T.
template <typename T>
struct FeatureGrid {
  int64_t height;
  int64_t width;
  int num_neighbours;            // 4 with the local ensemble, else 1
  T shift_y[kMaxNeighbours];     // added to coordinate 0 (y) for neighbour k
  T shift_x[kMaxNeighbours];     // added to coordinate 1 (x)
  T clamp_lo, clamp_hi;          // -1 + 1e-6, 1 - 1e-6
  T first_centre_y, step_y;      // make_coord: centre(i) = first_centre + step * i
  T first_centre_x, step_x;
  T size_y, size_x;              // H and W, the scale of relative coordinates and cells
  T area_eps;                    // 1e-9
  // Whether nearest sampling's source index is computed with a fused multiply-add, as torch's
  // grid_sample computes it on the device and dtype at hand (see nearest_index()).
  bool fused_index;
};

// Built on the host: the doubles below are the reference's Python floats, rounded to T exactly once.
// `fused_index`: see FeatureGrid.
template <typename T>
FeatureGrid<T> make_feature_grid(int64_t height, int64_t width, bool local_ensemble,
                                 bool fused_index) {
  FeatureGrid<T> g{};
  g.height = height;
  g.width = width;
  g.fused_index = fused_index;
  const double ry = 2.0 / static_cast<double>(height) / 2.0;  // reference `rx`: coordinate 0
  const double rx = 2.0 / static_cast<double>(width) / 2.0;   // reference `ry`: coordinate 1
  if (local_ensemble) {
    // The reference loops vx (coordinate 0) outside vy (coordinate 1), both over (-1, +1).
    const double eps = 1e-6;
    g.num_neighbours = 4;
    int k = 0;
    for (int vy = -1; vy <= 1; vy += 2) {
      for (int vx = -1; vx <= 1; vx += 2) {
        g.shift_y[k] = static_cast<T>(vy * ry + eps);
        g.shift_x[k] = static_cast<T>(vx * rx + eps);
        ++k;
      }
    }
  } else {
    g.num_neighbours = 1;
    for (int k = 0; k < kMaxNeighbours; ++k) {
      g.shift_y[k] = T(0);
      g.shift_x[k] = T(0);
    }
  }
  g.clamp_lo = static_cast<T>(-1 + 1e-6);
  g.clamp_hi = static_cast<T>(1 - 1e-6);
  // make_coord: seq = (v0 + r) + (2r) * arange(n), r = 1/n, with v0 + r and 2r Python floats.
  g.first_centre_y = static_cast<T>(-1 + 1.0 / static_cast<double>(height));
  g.step_y = static_cast<T>(2.0 / static_cast<double>(height));
  g.first_centre_x = static_cast<T>(-1 + 1.0 / static_cast<double>(width));
  g.step_x = static_cast<T>(2.0 / static_cast<double>(width));
  g.size_y = static_cast<T>(height);
  g.size_x = static_cast<T>(width);
  g.area_eps = static_cast<T>(1e-9);
  return g;
}

// grid_sample(mode="nearest", align_corners=False) source index along one axis of length `size`:
// ((c + 1) * size - 1) / 2 rounded half to even. torch computes it as written in CUDA, and as
// (c + 1) * (size / 2) - 0.5 in its vectorised CPU kernel: the same value, since halving is exact.
// Where the compiled code fuses the multiply and the subtraction into one FMA (CUDA, whose compiler
// contracts by default, and CPU builds whose instruction set has FMA), a coordinate exactly on a cell
// border can land on the other cell than with two roundings; `fused` follows torch on the device and
// dtype at hand (the CPU kernel asks torch once, see csrc/cpu). After the reference's clamp the index
// always lies in [0, size - 1]; the final bounds check only guards memory.
template <typename T>
LIIF_HOST_DEVICE int64_t nearest_index(T c, T size, int64_t n, bool fused) {
  const T a = add_rn(c, T(1));
  const T src = (fused ? fma_rn(a, size, T(-1)) : add_rn(mul_rn(a, size), T(-1))) / T(2);
  const T r = round_half_even(src);
  if (!(r >= T(0))) return 0;  // also catches NaN
  if (r > static_cast<T>(n - 1)) return n - 1;
  return static_cast<int64_t>(r);
}

template <typename T>
LIIF_HOST_DEVICE T clamp_coordinate(T c, T lo, T hi) {
  // torch.clamp: max(c, lo) then min(., hi).
  c = c < lo ? lo : c;
  return c > hi ? hi : c;
}

template <typename T>
struct Neighbour {
  int64_t iy, ix;  // LR cell chosen by nearest sampling
  T rel_y, rel_x;  // (coord - cell centre) * (H, W)
  T weight;        // blend weight: area of the diagonally opposite neighbour / total area
};

// Neighbour k of the query (cy, cx), finite coordinates: its LR cell (iy, ix) and relative
// coordinate, located(iy, ix, rel_y, rel_x); returns its area (before the ensemble's swap).
template <typename T, typename Located>
LIIF_HOST_DEVICE T locate_neighbour(const FeatureGrid<T>& g, T cy, T cx, int k, Located located) {
  const T sy = clamp_coordinate(add_rn(cy, g.shift_y[k]), g.clamp_lo, g.clamp_hi);
  const T sx = clamp_coordinate(add_rn(cx, g.shift_x[k]), g.clamp_lo, g.clamp_hi);
  const int64_t iy = nearest_index(sy, g.size_y, g.height, g.fused_index);
  const int64_t ix = nearest_index(sx, g.size_x, g.width, g.fused_index);
  const T centre_y = add_rn(g.first_centre_y, mul_rn(g.step_y, static_cast<T>(iy)));
  const T centre_x = add_rn(g.first_centre_x, mul_rn(g.step_x, static_cast<T>(ix)));
  // The relative coordinate uses the original, unshifted and unclamped query coordinate.
  const T rel_y = mul_rn(add_rn(cy, -centre_y), g.size_y);
  const T rel_x = mul_rn(add_rn(cx, -centre_x), g.size_x);
  located(iy, ix, rel_y, rel_x);
  return add_rn(abs_value(mul_rn(rel_y, rel_x)), g.area_eps);
}

// The neighbours of the query (cy, cx), handed out as they are found rather than collected:
// located(k, iy, ix, rel_y, rel_x) for k in [0, g.num_neighbours), and weight(k), a T& where the
// blend weight of neighbour k goes (it first holds the neighbour's area). Returns false (and calls
// neither) when a coordinate is NaN or infinite: the reference's output is then NaN, and the caller
// writes NaN itself instead of letting a meaningless index reach memory. A GPU kernel stores each
// neighbour in shared (or global) memory as it comes: collected in an array indexed by a runtime
// k, the neighbours and their areas lived in local memory (a 144-byte stack frame in every forward
// kernel); kept in registers, they spilled the kernels with the least room.
template <typename T, typename Located, typename Weight>
LIIF_HOST_DEVICE bool visit_neighbours(const FeatureGrid<T>& g, T cy, T cx, Located located,
                                       Weight weight) {
  if (!is_finite(cy) || !is_finite(cx)) return false;
  const int nn = g.num_neighbours;
  T total = T(0);
  for (int k = 0; k < nn; ++k) {
    const T area = locate_neighbour(g, cy, cx, k, [&](int64_t iy, int64_t ix, T rel_y, T rel_x) {
      located(k, iy, ix, rel_y, rel_x);
    });
    weight(k) = area;
    total = add_rn(total, area);  // stack(areas).sum(0): accumulated in neighbour order
  }
  // With the local ensemble each prediction takes the area of the diagonally opposite neighbour
  // (swaps 0<->3 and 1<->2, i.e. k <-> 3 - k); the total is taken before the swap. Each pair is
  // swapped once, from its first member (without the ensemble, neighbour 0 is its own opposite).
  // Kept rolled on the device: unrolled, the divisions' calls of their slow path made the wgmma
  // kernel (255 registers) spill elsewhere.
  LIIF_DEVICE_NO_UNROLL
  for (int k = 0; k < nn; ++k) {
    const int opposite = nn == kMaxNeighbours ? kMaxNeighbours - 1 - k : k;
    if (opposite < k) continue;
    const T area = weight(k);
    const T opposite_area = weight(opposite);
    weight(k) = opposite_area / total;
    weight(opposite) = area / total;
  }
  return true;
}

// Fills nb[0 .. g.num_neighbours) for the query (cy, cx); false (and nothing filled) as
// visit_neighbours.
template <typename T>
LIIF_HOST_DEVICE bool query_neighbours(const FeatureGrid<T>& g, T cy, T cx, Neighbour<T>* nb) {
  return visit_neighbours(
      g, cy, cx,
      [nb](int k, int64_t iy, int64_t ix, T rel_y, T rel_x) {
        nb[k].iy = iy;
        nb[k].ix = ix;
        nb[k].rel_y = rel_y;
        nb[k].rel_x = rel_x;
      },
      [nb](int k) -> T& { return nb[k].weight; });
}

// The first-layer input of the cell: (cell_y * H, cell_x * W).
template <typename T>
LIIF_HOST_DEVICE void scaled_cell(const FeatureGrid<T>& g, T cell_y, T cell_x, T* out) {
  out[0] = mul_rn(cell_y, g.size_y);
  out[1] = mul_rn(cell_x, g.size_x);
}

// The gradient (d/dcy, d/dcx) of a decodable query's coordinate, from its neighbours as
// query_neighbours fills them, the gradients of the MLP's relative-coordinate inputs of each
// neighbour (grad_rel_y, grad_rel_x) and those of the blend weights (grad_blend). Each relative
// coordinate is (coord - centre) * (H, W), and weight_k = area_opposite(k) / total with total = sum_j
// area_j, area_j = |rel_y_j rel_x_j| + 1e-9: d weight_k / d area_j = [j = opposite(k)] / total -
// weight_k / total. Evaluated as the reference's autograd evaluates it (the two terms apart, weight_k
// / total first), so that where they cancel (exactly, without the local ensemble, whose only weight
// is 1) both leave the same rounding. Shared by the CPU and CUDA backward kernels.
template <typename T>
LIIF_HOST_DEVICE void coordinate_gradient(const FeatureGrid<T>& g, const Neighbour<T>* nb,
                                          const T* grad_rel_y, const T* grad_rel_x,
                                          const T* grad_blend, T* out) {
  const int nn = g.num_neighbours;
  T total = T(0);
  for (int k = 0; k < nn; ++k) {
    total = add_rn(total, add_rn(abs_value(mul_rn(nb[k].rel_y, nb[k].rel_x)), g.area_eps));
  }
  T through_total = T(0);  // -sum_k grad_blend_k * (weight_k / total)
  for (int k = 0; k < nn; ++k) {
    through_total = add_rn(through_total, -mul_rn(grad_blend[k], nb[k].weight / total));
  }
  T gy = T(0), gx = T(0);
  for (int k = 0; k < nn; ++k) {
    const int opposite = nn == kMaxNeighbours ? kMaxNeighbours - 1 - k : k;
    const T grad_area = add_rn(grad_blend[opposite] / total, through_total);
    const T prod = mul_rn(nb[k].rel_y, nb[k].rel_x);
    const T sign = prod > T(0) ? T(1) : (prod < T(0) ? T(-1) : T(0));
    const T through_area = mul_rn(grad_area, sign);
    gy = add_rn(gy, mul_rn(add_rn(grad_rel_y[k], mul_rn(through_area, nb[k].rel_x)), g.size_y));
    gx = add_rn(gx, mul_rn(add_rn(grad_rel_x[k], mul_rn(through_area, nb[k].rel_y)), g.size_x));
  }
  out[0] = gy;
  out[1] = gx;
}

}  // namespace liif
