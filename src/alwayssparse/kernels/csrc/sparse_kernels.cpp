// CPU kernels for a truly sparse Linear layer  y = x @ W^T  (W: out x in, float32).
//
// Unstructured (CSR over the rows of W) kernels work "feature-major": a tile of NT batch rows of
// the gathered operand is transposed into a thread-local (features x NT) buffer that stays in L2,
// so every stored weight becomes a contiguous axpy / dot product over NT batch entries that is
// accumulated in vector registers.  The transposed product uses a CSC copy of the pattern (the
// CSR of W^T), so it is the same kernel and needs no atomics.  The sampled weight gradient
// (SDDMM) keeps one partial gradient per thread and sums them at the end.
//
// Block-sparse (BSR, b x b blocks, b = 4, 8, 16) products work directly on the row-major
// activations: one block is a small dense (NR x b) += (NR x b) * (b x b) product with NR rows of
// the batch held in vector registers (vector width = b floats).  The block weight gradient packs
// batch tiles of x into column panels and the grad_y columns of a chunk of block rows (row-wise
// reads), and keeps each b x b block gradient in vector registers over a batch tile.
//
// Compiled just in time by alwayssparse.kernels._build with -O3 -march=native -ffp-contract=fast
// (FMA contraction only, no -ffast-math).  Parallelism: at::parallel_for (torch's intra-op pool).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

namespace {

typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
// The widest vector the target has registers for (32 zmm with AVX-512, else 16 ymm).
#ifdef __AVX512F__
typedef vf16 vnat;
constexpr int VW = 16;
#else
typedef vf8 vnat;
constexpr int VW = 8;
#endif

template <int B> struct VecOf;
template <> struct VecOf<4> { typedef float type __attribute__((vector_size(16), aligned(4))); };
template <> struct VecOf<8> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <> struct VecOf<16> { typedef float type __attribute__((vector_size(64), aligned(4))); };

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buf = std::unique_ptr<float, FreeDeleter>;

Buf alloc_aligned(int64_t n) {
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 16)) * sizeof(float);
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "alwayssparse kernels: out of memory");
  return Buf(static_cast<float*>(p));
}

inline float hsum16(vf16 v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}


typedef float vf16u __attribute__((vector_size(64), aligned(4)));

// Two-source lane permutation stages of a 16 x 16 transpose (block-swap of size H).
#define AS_STAGE(H, LO, HI)                                                        \
  for (int i = 0; i < 16; ++i) {                                                    \
    if (i & H) continue;                                                            \
    const vf16 a = r[i], b = r[i + H];                                              \
    r[i] = __builtin_shufflevector(a, b, LO);                                       \
    r[i + H] = __builtin_shufflevector(a, b, HI);                                   \
  }
#define AS_L8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define AS_H8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define AS_L4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define AS_H4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define AS_L2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define AS_H2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define AS_L1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define AS_H1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31

// dst[c * ldd + j] = src[j * lds + c] for a full 8 x 8 block, the same stages on 8 lanes.
inline void transpose8(const float* __restrict src, int64_t lds, float* __restrict dst,
                       int64_t ldd) {
  typedef float vf8u __attribute__((vector_size(32), aligned(4)));
  vf8 r[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const vf8u*>(src + i * lds);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const vf8 a = r[i], b = r[i + 4];
    r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    if (i & 2) continue;
    const vf8 a = r[i], b = r[i + 2];
    r[i] = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
    r[i + 2] = __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    const vf8 a = r[i], b = r[i + 1];
    r[i] = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) *reinterpret_cast<vf8u*>(dst + i * ldd) = r[i];
}

// dst[c * ldd + j] = src[j * lds + c] for a full 16 x 16 block.  Without AVX-512: four 8 x 8
// transposes (GCC lowers the 64-byte shuffles below through the stack on AVX2).
inline void transpose16(const float* __restrict src, int64_t lds, float* __restrict dst,
                        int64_t ldd) {
#ifndef __AVX512F__
  transpose8(src, lds, dst, ldd);
  transpose8(src + 8, lds, dst + 8 * ldd, ldd);
  transpose8(src + 8 * lds, lds, dst + 8, ldd);
  transpose8(src + 8 * lds + 8, lds, dst + 8 * ldd + 8, ldd);
#else
  vf16 r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = *reinterpret_cast<const vf16u*>(src + i * lds);
#pragma GCC unroll 16
  AS_STAGE(8, AS_L8, AS_H8)
#pragma GCC unroll 16
  AS_STAGE(4, AS_L4, AS_H4)
#pragma GCC unroll 16
  AS_STAGE(2, AS_L2, AS_H2)
#pragma GCC unroll 16
  AS_STAGE(1, AS_L1, AS_H1)
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) *reinterpret_cast<vf16u*>(dst + i * ldd) = r[i];
#endif
}

// out[m] = sum of the lanes of v[m] (m < 16), 30 permutes + 15 adds for 16 sums.
inline vf16 reduce16(const vf16* v) {
  vf16 a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], AS_L8) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], AS_H8);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17,
                                   18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                   20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// out[m] = sum of the lanes of v[m] (m < 8) for 8-lane vectors: 14 permutes + 7 adds.
inline vf8 reduce8(const vf8* v) {
  vf8 a[4], b[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 3, 5, 7, 9, 11, 13, 15);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 3, 5, 7, 9, 11, 13, 15);
  return __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

// part[m] += sum of the lanes of pend[m] for m < cnt (pend[cnt..16) is clobbered).
inline void flush_sums(vnat* pend, int cnt, float* __restrict part) {
  for (int m = cnt; m < 16; ++m) pend[m] = vnat{};
#ifdef __AVX512F__
  const vf16 s16 = reduce16(pend);
#else
  const vf8 lo = reduce8(pend), hi = reduce8(pend + 8);
  alignas(64) float s16[16];
  *reinterpret_cast<vf8*>(s16) = lo;
  *reinterpret_cast<vf8*>(s16 + 8) = hi;
#endif
  for (int m = 0; m < cnt; ++m) part[m] += s16[m];
}

// Output tensors of a few MiB and more: 2 MiB aligned + MADV_HUGEPAGE, so that first touch
// costs one page fault per 2 MiB instead of one per 4 KiB (large on VMs).
at::Tensor alloc_output(at::IntArrayRef sizes, bool zero) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  constexpr size_t HUGE_SZ = 2u << 20;
  if (bytes < 4 * HUGE_SZ) {
    auto opt = at::TensorOptions().dtype(at::kFloat);
    return zero ? at::zeros(sizes, opt) : at::empty(sizes, opt);
  }
  const size_t alloc = (bytes + HUGE_SZ - 1) / HUGE_SZ * HUGE_SZ;
  void* p = std::aligned_alloc(HUGE_SZ, alloc);
  TORCH_CHECK(p != nullptr, "alwayssparse kernels: out of memory");
#ifdef MADV_HUGEPAGE
  madvise(p, alloc, MADV_HUGEPAGE);
#endif
  auto t = at::from_blob(p, sizes, [](void* q) { std::free(q); },
                         at::TensorOptions().dtype(at::kFloat));
  if (zero) t.zero_();
  return t;
}

// bt[c * NT + j] = x[(n0 + j) * ld + c] for c < K, j < nt; zero for nt <= j < NT.
template <int NT>
void pack_tile_t(const float* __restrict x, int64_t ld, int64_t n0, int64_t nt, int64_t K,
                 float* __restrict bt) {
  const int64_t jf = nt / 16 * 16, cf = K / 16 * 16;
  // Row-block outer: 16 sequential row streams (prefetch-friendly for wide rows).
  for (int64_t j0 = 0; j0 < jf; j0 += 16)
    for (int64_t c0 = 0; c0 < cf; c0 += 16)
      transpose16(x + (n0 + j0) * ld + c0, ld, bt + c0 * NT + j0, NT);
  // Ragged edges.
  for (int64_t j = 0; j < nt; ++j) {
    const float* src = x + (n0 + j) * ld;
    const int64_t cs = (j < jf) ? cf : 0;
    for (int64_t c = cs; c < K; ++c) bt[c * NT + j] = src[c];
  }
  if (nt < NT) {
    for (int64_t c = 0; c < K; ++c) std::memset(bt + c * NT + nt, 0, sizeof(float) * (NT - nt));
  }
}

// y[(n0 + j) * ld + r0 + i] = ob[i * NT + j] for i < rr, j < nt.
template <int NT>
inline void unpack_rows(const float* __restrict ob, int64_t rr, int64_t nt, float* __restrict y,
                        int64_t ld) {
  if (rr == 16) {
    const int64_t jf = nt / 16 * 16;
    for (int64_t j0 = 0; j0 < jf; j0 += 16) transpose16(ob + j0, NT, y + j0 * ld, ld);
    for (int64_t j = jf; j < nt; ++j)
      for (int64_t i = 0; i < 16; ++i) y[j * ld + i] = ob[i * NT + j];
  } else {
    for (int64_t j = 0; j < nt; ++j)
      for (int64_t i = 0; i < rr; ++i) y[j * ld + i] = ob[i * NT + j];
  }
}

// Dynamic scheduling on torch's pool: one worker per thread pulls items from a shared counter,
// so a thread that is descheduled (busy machine) does not hold the others back.
// body(worker, begin_item_callback) is called once per worker with a `next` function.
template <class Body>
void run_workers(int64_t items, Body&& body) {
  const int64_t nw = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::atomic<int64_t> counter{0};
  auto next = [&counter, items]() -> int64_t {
    const int64_t it = counter.fetch_add(1, std::memory_order_relaxed);
    return it < items ? it : -1;
  };
  if (nw == 1) {
    body(int64_t{0}, next);
    return;
  }
  at::parallel_for(0, nw, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) body(w, next);
  });
}

// Work split shared by the feature-major kernels: items = batch tiles x chunks of 16-row groups.
struct Split {
  int64_t ntiles, ngroups, nchunks, gper, items;
};

Split make_split(int64_t N, int64_t NT, int64_t R) {
  Split s;
  s.ntiles = (N + NT - 1) / NT;
  s.ngroups = (R + 15) / 16;
  const int64_t nth = at::get_num_threads();
  int64_t want = (8 * nth + s.ntiles - 1) / std::max<int64_t>(s.ntiles, 1);
  s.nchunks = std::max<int64_t>(1, std::min<int64_t>(s.ngroups, want));
  s.gper = (s.ngroups + s.nchunks - 1) / s.nchunks;
  s.nchunks = (s.ngroups + s.gper - 1) / std::max<int64_t>(s.gper, 1);
  s.nchunks = std::max<int64_t>(s.nchunks, 1);
  s.items = s.ntiles * s.nchunks;
  return s;
}

// out[(r - r0) * NT + :] = sum_k val[k] * bt[idx[k] * NT + :] for r in [r0, r1).
// Column indices I are int32 or int64 (row pointers are always int64).  Written on the native
// vector (vnat): GCC lowers a scalar times a 64-byte vector badly without AVX-512 (the scalar
// is broadcast through the stack), a scalar times a native vector is one vbroadcastss.  The
// NT / VW accumulators must stay in registers (pick_nv); with few of them, two accumulator sets
// alternate to hide the FMA latency.
// With ``bias``, out row r gets bias[r] added to the finished sum (as ``y + bias`` would).
template <int NV, typename I>
inline void spmm_rows(const int64_t* __restrict ptr, const I* __restrict idx,
                      const float* __restrict val, int64_t r0, int64_t r1,
                      const float* __restrict bt, float* __restrict out,
                      const float* __restrict bias) {
  constexpr int NT = 16 * NV;
  constexpr int NN = NT / VW;
  constexpr int NA = NN >= 4 ? 1 : 2;
  for (int64_t r = r0; r < r1; ++r) {
    vnat a[NA][NN];
#pragma GCC unroll 16
    for (int s = 0; s < NA; ++s)
#pragma GCC unroll 16
      for (int i = 0; i < NN; ++i) a[s][i] = vnat{};
    int64_t k = ptr[r];
    const int64_t ke = ptr[r + 1];
    for (; k + NA <= ke; k += NA) {
#pragma GCC unroll 2
      for (int s = 0; s < NA; ++s) {
        const vnat* src = reinterpret_cast<const vnat*>(bt + idx[k + s] * NT);
        const float v = val[k + s];
#pragma GCC unroll 16
        for (int i = 0; i < NN; ++i) a[s][i] += v * src[i];
      }
    }
    for (; k < ke; ++k) {
      const vnat* src = reinterpret_cast<const vnat*>(bt + idx[k] * NT);
      const float v = val[k];
#pragma GCC unroll 16
      for (int i = 0; i < NN; ++i) a[0][i] += v * src[i];
    }
    vnat* o = reinterpret_cast<vnat*>(out + (r - r0) * NT);
#pragma GCC unroll 16
    for (int i = 0; i < NN; ++i) {
      vnat sum = a[0][i];
#pragma GCC unroll 2
      for (int s = 1; s < NA; ++s) sum += a[s][i];
      o[i] = sum;
    }
    if (bias != nullptr) {
      const float b = bias[r];
#pragma GCC unroll 16
      for (int i = 0; i < NN; ++i) o[i] += b;
    }
  }
}

// y (N x R) = x (N x K) @ S^T where S (R x K) is CSR (ptr, idx, val).
template <int NV, typename I>
void spmm_fm(const int64_t* ptr, const I* idx, const float* val, int64_t R,
             const float* x, int64_t N, int64_t K, float* y, const float* bias) {
  constexpr int NT = 16 * NV;
  const Split s = make_split(N, NT, R);
  run_workers(s.items, [&](int64_t, auto& next) {
    Buf bt = alloc_aligned(K * NT);
    Buf ob = alloc_aligned(16 * NT);
    int64_t cur = -1;
    for (int64_t it; (it = next()) >= 0;) {
      const int64_t t = it / s.nchunks, c = it % s.nchunks;
      const int64_t n0 = t * NT, nt = std::min<int64_t>(NT, N - n0);
      if (t != cur) {
        pack_tile_t<NT>(x, K, n0, nt, K, bt.get());
        cur = t;
      }
      const int64_t g1 = std::min(s.ngroups, (c + 1) * s.gper);
      for (int64_t g = c * s.gper; g < g1; ++g) {
        const int64_t r0 = g * 16, rr = std::min<int64_t>(16, R - r0);
        spmm_rows<NV, I>(ptr, idx, val, r0, r0 + rr, bt.get(), ob.get(), bias);
        unpack_rows<NT>(ob.get(), rr, nt, y + n0 * R + r0, R);
      }
    }
  });
}

// gv[k] = sum_n gy[n, row(k)] * x[n, idx[k]]
template <int NV, typename I>
void sddmm_fm(const int64_t* ptr, const I* idx, int64_t R, const float* gy,
              const float* x, int64_t N, int64_t K, float* gv) {
  constexpr int NT = 16 * NV;
  const int64_t nnz = ptr[R];
  const Split s = make_split(N, NT, R);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // Per-worker partial sums.
  std::vector<Buf> parts(nth);
  std::vector<char> used(nth, 0);
  run_workers(s.items, [&](int64_t tid, auto& next) {
    int64_t it = next();
    if (it < 0) return;
    parts[tid] = alloc_aligned(nnz);
    std::memset(parts[tid].get(), 0, sizeof(float) * nnz);
    used[tid] = 1;
    float* part = parts[tid].get();
    Buf bt = alloc_aligned(K * NT);
    constexpr int64_t SG = 16;
    Buf gb = alloc_aligned(SG * 16 * NT);
    int64_t cur = -1;
    for (; it >= 0; it = next()) {
      const int64_t t = it / s.nchunks, c = it % s.nchunks;
      const int64_t n0 = t * NT, nt = std::min<int64_t>(NT, N - n0);
      if (t != cur) {
        pack_tile_t<NT>(x, K, n0, nt, K, bt.get());
        cur = t;
      }
      int64_t pg0 = 0, pg1 = -1;
      const int64_t g1 = std::min(s.ngroups, (c + 1) * s.gper);
      for (int64_t g = c * s.gper; g < g1; ++g) {
        const int64_t r0 = g * 16, rr = std::min<int64_t>(16, R - r0);
        if (ptr[r0 + rr] == ptr[r0]) continue;
        // grad_y columns of SG groups are packed at once (row-wise reads of gy).
        if (g >= pg1) {
          pg0 = g;
          pg1 = std::min(g1, g + SG);
          const int64_t c1 = std::min(R, pg1 * 16);
          pack_tile_t<NT>(gy + r0, R, n0, nt, c1 - r0, gb.get());
        }
        const float* gt = gb.get() + (g - pg0) * 16 * NT;
        // Dot products of 16 consecutive stored entries are reduced together, on native
        // vectors (NN per tile row; see spmm_rows for why not 64-byte vectors without AVX-512).
        constexpr int NN = NT / VW;
        alignas(64) vnat pend[16];
        int np = 0;
        int64_t kbase = ptr[r0];
        auto flush = [&](int cnt) { flush_sums(pend, cnt, part + kbase); };
        for (int64_t r = r0; r < r0 + rr; ++r) {
          vnat gr[NN];
          const vnat* gsrc = reinterpret_cast<const vnat*>(gt + (r - r0) * NT);
#pragma GCC unroll 16
          for (int i = 0; i < NN; ++i) gr[i] = gsrc[i];
          const int64_t ke = ptr[r + 1];
          for (int64_t k = ptr[r]; k < ke; ++k) {
            const vnat* xs = reinterpret_cast<const vnat*>(bt.get() + idx[k] * NT);
            vnat a0 = gr[0] * xs[0];
            if constexpr (NN > 1) {
              vnat a1 = gr[1] * xs[1];
#pragma GCC unroll 16
              for (int i = 2; i < NN; i += 2) {
                a0 += gr[i] * xs[i];
                a1 += gr[i + 1] * xs[i + 1];
              }
              a0 += a1;
            }
            pend[np++] = a0;
            if (np == 16) {
              flush(16);
              kbase += 16;
              np = 0;
            }
          }
        }
        if (np > 0) flush(np);
      }
    }
  });
  // Reduce the partials.
  std::vector<const float*> ps;
  for (int64_t t = 0; t < nth; ++t)
    if (used[t]) ps.push_back(parts[t].get());
  at::parallel_for(0, nnz, 4096, [&](int64_t b, int64_t e) {
    if (ps.empty()) {
      std::memset(gv + b, 0, sizeof(float) * (e - b));
      return;
    }
    for (int64_t k = b; k < e; ++k) {
      float acc = ps[0][k];
      for (size_t t = 1; t < ps.size(); ++t) acc += ps[t][k];
      gv[k] = acc;
    }
  });
}

// The batch tile NT = 16 * NV of the feature-major kernels: nt_req when given, else the
// product's default, halved while half a tile covers the batch. Measured on the 4L d512 LM's
// four Linear shapes at 10% density (N = 2048, 2 threads, AVX-512), ms per set of products:
//
//   NT                  16     32     64    128
//   SpMM (fwd + dX)   28.6   26.6   29.3   32.0
//   SDDMM (dW)        28.7   19.0   15.7   16.1
//
// A SpMM nonzero is an axpy over NT entries of a (K x NT) tile row: with NT = 32 the tile
// (64 KiB at K = 512) stays close to L1, which outweighs the per-nonzero index work that a
// wider tile shares. The SDDMM's dot products reduce across their NT lanes, so they want more.
int pick_nv(int64_t N, int64_t K, int64_t nt_req, int64_t nt_default) {
  int64_t nt;
  if (nt_req > 0) {
    nt = nt_req;
  } else {
    nt = nt_default;
    // Keep the transposed (K x NT) tile within ~1 MiB (half an L2 of a recent server core).
    const int64_t budget = 1 << 20;
    while (nt > 16 && K * nt * 4 > budget) nt /= 2;
    while (nt > 16 && nt / 2 >= N) nt /= 2;
  }
  int nv = nt >= 128 ? 8 : nt >= 64 ? 4 : nt >= 32 ? 2 : 1;
#ifndef __AVX512F__
  // Without AVX-512 the SpMM's 16 * NV / VW accumulators and the SDDMM's NV grad_y vectors must
  // fit the 16 ymm registers (NV = 8 spills them to the stack); an explicit tile is kept.
  if (nt_req <= 0) nv = std::min(nv, 4);
#endif
  return nv;
}

void check_csr(const at::Tensor& ptr, const at::Tensor& idx) {
  TORCH_CHECK(ptr.dtype() == at::kLong, "row pointers must be int64");
  TORCH_CHECK(idx.dtype() == at::kLong || idx.dtype() == at::kInt,
              "column indices must be int32 or int64");
  TORCH_CHECK(ptr.is_contiguous() && idx.is_contiguous(), "indices must be contiguous");
}

// Calls fn(const I*) with the column indices as int32 or int64.
template <class Fn>
void with_indices(const at::Tensor& idx, Fn&& fn) {
  if (idx.dtype() == at::kInt) {
    fn(idx.data_ptr<int32_t>());
  } else {
    fn(idx.data_ptr<int64_t>());
  }
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// ---------------------------------------------------------------- unstructured entry points

// Optional bias (R floats), added to every row of the result.
const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t R) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                  bias->size(0) == R,
              "bias must be a contiguous float32 vector of the output size");
  return bias->data_ptr<float>();
}

at::Tensor csr_spmm(at::Tensor ptr, at::Tensor idx, at::Tensor val, at::Tensor x, int64_t R,
                    int64_t nt, c10::optional<at::Tensor> bias) {
  check_csr(ptr, idx);
  check_dense(x, "x");
  TORCH_CHECK(val.dtype() == at::kFloat && val.is_contiguous(), "values must be float32");
  const int64_t N = x.size(0), K = x.size(1);
  const float* bp = bias_data(bias, R);
  auto y = alloc_output({N, R}, false);
  if (N == 0 || R == 0) return y;
  const int nv = pick_nv(N, K, nt, 32);
  const int64_t* p = ptr.data_ptr<int64_t>();
  const float* v = val.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_indices(idx, [&](const auto* c) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(c)>>;
    switch (nv) {
      case 8: spmm_fm<8, I>(p, c, v, R, xp, N, K, yp, bp); break;
      case 4: spmm_fm<4, I>(p, c, v, R, xp, N, K, yp, bp); break;
      case 2: spmm_fm<2, I>(p, c, v, R, xp, N, K, yp, bp); break;
      default: spmm_fm<1, I>(p, c, v, R, xp, N, K, yp, bp); break;
    }
  });
  return y;
}

at::Tensor csr_sddmm(at::Tensor ptr, at::Tensor idx, at::Tensor gy, at::Tensor x, int64_t nt) {
  check_csr(ptr, idx);
  check_dense(gy, "grad_y");
  check_dense(x, "x");
  const int64_t R = ptr.size(0) - 1, N = x.size(0), K = x.size(1);
  const int64_t nnz = idx.size(0);
  auto gv = at::zeros({nnz}, x.options());
  if (nnz == 0 || N == 0) return gv;
  const int nv = pick_nv(N, K, nt, 64);
  const int64_t* p = ptr.data_ptr<int64_t>();
  const float* g = gy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* o = gv.data_ptr<float>();
  with_indices(idx, [&](const auto* c) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(c)>>;
    switch (nv) {
      case 8: sddmm_fm<8, I>(p, c, R, g, xp, N, K, o); break;
      case 4: sddmm_fm<4, I>(p, c, R, g, xp, N, K, o); break;
      case 2: sddmm_fm<2, I>(p, c, R, g, xp, N, K, o); break;
      default: sddmm_fm<1, I>(p, c, R, g, xp, N, K, o); break;
    }
  });
  return gv;
}

// Transpose of a compressed pattern: (ptr over R, idx in [0, C)) -> (tptr over C, tidx, perm)
// with perm[t] = position in the original arrays, indices sorted within each output row.
// tidx and perm have the dtype of idx (int32 needs nnz and R below 2^31).
template <typename I>
void transpose_impl(const int64_t* p, const I* c, int64_t R, int64_t nnz, int64_t C, int64_t* tp,
                    I* ti, I* pm) {
  for (int64_t k = 0; k < nnz; ++k) tp[c[k] + 1]++;
  for (int64_t j = 0; j < C; ++j) tp[j + 1] += tp[j];
  std::vector<int64_t> fill(tp, tp + C);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = p[r]; k < p[r + 1]; ++k) {
      const int64_t d = fill[c[k]]++;
      ti[d] = static_cast<I>(r);
      pm[d] = static_cast<I>(k);
    }
  }
}

std::vector<at::Tensor> compressed_transpose(at::Tensor ptr, at::Tensor idx, int64_t C) {
  check_csr(ptr, idx);
  const int64_t R = ptr.size(0) - 1, nnz = idx.size(0);
  if (idx.dtype() == at::kInt) {
    TORCH_CHECK(nnz < (int64_t{1} << 31) && R < (int64_t{1} << 31),
                "int32 indices need fewer than 2^31 rows and entries");
  }
  auto tptr = at::zeros({C + 1}, ptr.options());
  auto tidx = at::empty({nnz}, idx.options());
  auto perm = at::empty({nnz}, idx.options());
  const int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* tp = tptr.data_ptr<int64_t>();
  if (idx.dtype() == at::kInt) {
    transpose_impl<int32_t>(p, idx.data_ptr<int32_t>(), R, nnz, C, tp, tidx.data_ptr<int32_t>(),
                            perm.data_ptr<int32_t>());
  } else {
    transpose_impl<int64_t>(p, idx.data_ptr<int64_t>(), R, nnz, C, tp, tidx.data_ptr<int64_t>(),
                            perm.data_ptr<int64_t>());
  }
  return {tptr, tidx, perm};
}

// ---------------------------------------------------------------- block-sparse kernels

// y (N x NBR*B) = x (N x K) @ W^T with W's blocks given transposed: wt[blk][q][p] = W_blk[p][q].
// A block row of b floats is H native vectors (H = 2 for b = 16 without AVX-512: a scalar times
// a 64-byte vector is lowered through the stack there, see spmm_rows).
template <int B, int NR, typename I>
inline void bsr_rows(const int64_t* __restrict bptr, const I* __restrict bidx,
                     const float* __restrict wt, int64_t i0, int64_t i1,
                     const float* __restrict x, int64_t K, float* __restrict y, int64_t M,
                     const float* __restrict bias, int64_t bstride = B) {
  constexpr int H = B > VW ? B / VW : 1;
  typedef typename VecOf<B / H>::type vb;
  for (int64_t i = i0; i < i1; ++i) {
    vb acc[NR][H];
#pragma GCC unroll 32
    for (int t = 0; t < NR; ++t)
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) acc[t][h] = vb{};
    for (int64_t blk = bptr[i]; blk < bptr[i + 1]; ++blk) {
      const float* xs = x + bidx[blk] * bstride;
      const vb* w = reinterpret_cast<const vb*>(wt + blk * B * B);
#pragma GCC unroll 4
      for (int q = 0; q < B; ++q) {
        vb wq[H];
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) wq[h] = w[q * H + h];
#pragma GCC unroll 32
        for (int t = 0; t < NR; ++t) {
          const float xv = xs[t * K + q];
#pragma GCC unroll 2
          for (int h = 0; h < H; ++h) acc[t][h] += xv * wq[h];
        }
      }
    }
    if (bias != nullptr) {  // added to the finished sums, as y + bias would
      vb bv[H];
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) std::memcpy(&bv[h], bias + i * B + h * (B / H), sizeof(vb));
#pragma GCC unroll 32
      for (int t = 0; t < NR; ++t)
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) acc[t][h] += bv[h];
    }
#pragma GCC unroll 32
    for (int t = 0; t < NR; ++t)
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h)
        *reinterpret_cast<vb*>(y + t * M + i * B + h * (B / H)) = acc[t][h];
  }
}

template <int B, typename I>
void bsr_spmm_impl(const int64_t* bptr, const I* bidx, const float* wt, int64_t NBR,
                   const float* x, int64_t N, int64_t K, float* y, const float* bias) {
  // Rows of x per pass: NR * H accumulators, H weight vectors and a broadcast in registers.
  constexpr int NR = B > VW ? 6 : 12;
  const int64_t M = NBR * B;
  const int64_t nblk = (N + NR - 1) / NR;
  const int64_t nth = at::get_num_threads();
  int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(NBR, (8 * nth + nblk - 1) / nblk));
  const int64_t iper = (NBR + nchunks - 1) / nchunks;
  nchunks = (NBR + iper - 1) / iper;
  const int64_t NBC = K / B;
  run_workers(nblk * nchunks, [&](int64_t, auto& next) {
    // The NR rows of x of the current row group, packed per block column: xk[j][t][q], so the
    // x operand of a block is NR * B contiguous floats (no cache-set conflicts between rows).
    Buf xbuf = alloc_aligned(NR * K);
    float* xk = xbuf.get();
    int64_t cur = -1;
    for (int64_t it; (it = next()) >= 0;) {
      const int64_t nb = it / nchunks, c = it % nchunks;
      const int64_t n0 = nb * NR, nr = std::min<int64_t>(NR, N - n0);
      const int64_t i0 = c * iper, i1 = std::min(NBR, i0 + iper);
      if (nr == NR) {
        if (nb != cur) {
          for (int t = 0; t < NR; ++t) {
            const float* src = x + (n0 + t) * K;
            for (int64_t j = 0; j < NBC; ++j)
              std::memcpy(xk + (j * NR + t) * B, src + j * B, sizeof(float) * B);
          }
          cur = nb;
        }
        bsr_rows<B, NR, I>(bptr, bidx, wt, i0, i1, xk, B, y + n0 * M, M, bias, NR * B);
      } else {
        for (int64_t n = n0; n < n0 + nr; ++n)
          bsr_rows<B, 1, I>(bptr, bidx, wt, i0, i1, x + n * K, K, y + n * M, M, bias);
      }
    }
  });
}

// Sum of the L = VW / B lane groups of a native vector: lane c of the result is the sum of
// lanes c, c + B, c + 2 B, ... (the L batch rows that shared the vector).
template <int B>
inline typename VecOf<B>::type fold_lanes(typename VecOf<VW>::type s) {
  if constexpr (VW == 16) {
    const vf8 h = __builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15);
    if constexpr (B == 8) return h;
    else
      return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  } else {
    if constexpr (B == 8) return s;
    else
      return __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
  }
}

// G[blk][p][q] = sum_n gy[n, i*B + p] * x[n, j*B + q]
//
// Block rows are split into chunks of about equal block counts; a worker walks its chunk batch
// tile by batch tile (T rows).  Per tile it packs x into column panels xp[j][n][q] (L2), so a
// block's x operand is one contiguous (T x B) stream, and the chunk's grad_y columns into
// gc[i][n][p] (row-wise reads), reused by all blocks of a block row.  The accumulator of a
// block (B x B) stays in vector registers over the whole tile:
//  * B = 16: acc[p] += broadcast(gy[n][p]) * x[n][q0:q0+VW], all 16 rows p at once with
//    AVX-512, in four 8 x 8 quarters of the block without (8 vf8 accumulators);
//  * B = 4, 8: L = VW / B batch rows share one native vector (VW = 16 floats with AVX-512, else
//    8): lanes l <-> (row n + l / B, column l % B),
//    with grad_y packed pre-broadcast (lane l holds gy[n + l / B][p]); the L partial sums of a
//    column are added at the end.
template <int B>
inline void sddmm_block(const float* __restrict gb, const float* __restrict xs, int64_t nt,
                        float* __restrict g, bool first) {
  if constexpr (B == 16) {
    // Passes over PR rows p x VW columns q of the block, PR native accumulators each: one pass
    // with AVX-512 (16 zmm), four 8 x 8 quarters without (8 of the 16 ymm).
    constexpr int PR = VW == 16 ? 16 : 8;
    typedef typename VecOf<VW>::type vo;
#pragma GCC unroll 1
    for (int p0 = 0; p0 < 16; p0 += PR) {
#pragma GCC unroll 1
      for (int q0 = 0; q0 < 16; q0 += VW) {
        vnat acc[PR];
#pragma GCC unroll 16
        for (int p = 0; p < PR; ++p) acc[p] = vnat{};
        for (int64_t n = 0; n < nt; ++n) {
          const vnat xv = *reinterpret_cast<const vnat*>(xs + n * 16 + q0);
          const float* gr = gb + n * 16 + p0;
#pragma GCC unroll 16
          for (int p = 0; p < PR; ++p) acc[p] += gr[p] * xv;
        }
#pragma GCC unroll 16
        for (int p = 0; p < PR; ++p) {
          vo* o = reinterpret_cast<vo*>(g + (p0 + p) * 16 + q0);
          *o = first ? acc[p] : *o + acc[p];
        }
      }
    }
  } else {
    // L = VW / B batch rows share one native vector vl (see bsr_sddmm_impl's packing).
    constexpr int L = VW / B;
    typedef typename VecOf<VW>::type vl;
    typedef typename VecOf<B>::type vb;
    const int64_t ng = (nt + L - 1) / L;
    // Accumulator sets alternating over q: 2 B vectors in registers (32 zmm; 16 ymm for B = 4),
    // one set of B = 8 ymm for b = 8 without AVX-512.
    constexpr int NS = (VW == 16 || B == 4) ? 2 : 1;
    const vl* gv = reinterpret_cast<const vl*>(gb);
    const vl* xv = reinterpret_cast<const vl*>(xs);
    vl a[NS][B];
#pragma GCC unroll 2
    for (int u = 0; u < NS; ++u)
#pragma GCC unroll 16
      for (int p = 0; p < B; ++p) a[u][p] = vl{};
    int64_t q = 0;
    for (; q + NS <= ng; q += NS) {
#pragma GCC unroll 2
      for (int u = 0; u < NS; ++u) {
        const vl x0 = xv[q + u];
#pragma GCC unroll 16
        for (int p = 0; p < B; ++p) a[u][p] += gv[(q + u) * B + p] * x0;
      }
    }
    for (; q < ng; ++q) {
      const vl x0 = xv[q];
#pragma GCC unroll 16
      for (int p = 0; p < B; ++p) a[0][p] += gv[q * B + p] * x0;
    }
    vb* o = reinterpret_cast<vb*>(g);
#pragma GCC unroll 16
    for (int p = 0; p < B; ++p) {
      vl s = a[0][p];
#pragma GCC unroll 2
      for (int u = 1; u < NS; ++u) s += a[u][p];
      o[p] = first ? fold_lanes<B>(s) : o[p] + fold_lanes<B>(s);
    }
  }
}

template <int B, typename I>
void bsr_sddmm_impl(const int64_t* bptr, const I* bidx, int64_t NBR, const float* gy,
                    const float* x, int64_t N, int64_t K, float* G) {
  constexpr int L = B < 16 ? VW / B : 1;  // batch rows per native vector in sddmm_block
  const int64_t M = NBR * B, NBC = K / B;
  const int64_t nth = at::get_num_threads();
  // Chunks of block rows with about equal block counts.
  const int64_t nb = bptr[NBR];
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(NBR, 2 * nth));
  std::vector<int64_t> cb(nchunks + 1, NBR);
  cb[0] = 0;
  int64_t maxrows = 0;
  for (int64_t c = 1; c <= nchunks; ++c) {
    if (c < nchunks) {
      const int64_t target = nb * c / nchunks;
      cb[c] = std::lower_bound(bptr, bptr + NBR + 1, target) - bptr;
      cb[c] = std::max(cb[c], cb[c - 1]);
    }
    maxrows = std::max(maxrows, cb[c] - cb[c - 1]);
  }
  // Batch tile: the x panels of one tile (T x K) and the grad_y columns of a chunk
  // (T x rows * B) fit in L2, as does the pre-broadcast grad_y of one block row (T * B * B
  // floats, B < 16).
  int64_t T = 256;
  while (T > 32 && (T * K * 4 > (1 << 20) || T * maxrows * B * 4 > (512 << 10))) T /= 2;
  if constexpr (B < 16) {
    while (T > 32 && T * B * B * 4 > (64 << 10)) T /= 2;
  }
  const int64_t gsz = (B == 16) ? 16 : T * B * B;
  run_workers(nchunks, [&](int64_t, auto& next) {
    Buf gbuf = alloc_aligned(gsz);
    Buf cbuf = alloc_aligned(T * maxrows * B);
    Buf xbuf = alloc_aligned(NBC * T * B);
    float* gb = gbuf.get();
    float* gc = cbuf.get();
    float* xp = xbuf.get();
    for (int64_t it; (it = next()) >= 0;) {
      const int64_t ib = cb[it], ie = cb[it + 1];
      if (bptr[ie] == bptr[ib]) continue;
      // Non-empty block rows and column panels used by this chunk (only those are packed).
      std::vector<int64_t> rs, js;
      std::vector<char> used(NBC, 0);
      for (int64_t i = ib; i < ie; ++i) {
        if (bptr[i + 1] > bptr[i]) rs.push_back(i);
        for (int64_t k = bptr[i]; k < bptr[i + 1]; ++k) used[bidx[k]] = 1;
      }
      for (int64_t j = 0; j < NBC; ++j)
        if (used[j]) js.push_back(j);
      const int64_t nr = static_cast<int64_t>(rs.size());
      for (int64_t n0 = 0; n0 < N; n0 += T) {
        const int64_t nt = std::min(T, N - n0);
        const bool first = (n0 == 0);
        // x tile in column panels xp[j][n][q] (rows nt..round_up(nt, 16) zero).
        const int64_t ntp = (nt + 15) / 16 * 16;
        for (int64_t n = 0; n < ntp; ++n) {
          if (n < nt) {
            const float* src = x + (n0 + n) * K;
            for (const int64_t j : js)
              std::memcpy(xp + (j * T + n) * B, src + j * B, sizeof(float) * B);
          } else {
            for (const int64_t j : js) std::memset(xp + (j * T + n) * B, 0, sizeof(float) * B);
          }
        }
        // Row-wise (sequential) read of the chunk's grad_y columns: gc[il][n][p].
        for (int64_t n = 0; n < nt; ++n) {
          const float* src = gy + (n0 + n) * M + ib * B;
          for (int64_t il = 0; il < nr; ++il)
            std::memcpy(gc + (il * T + n) * B, src + (rs[il] - ib) * B, sizeof(float) * B);
        }
        for (int64_t il = 0; il < nr; ++il) {
          const int64_t i = rs[il];
          const float* gs = gc + il * T * B;
          const float* gp = gs;
          if constexpr (B < 16) {
            const int64_t ng = (nt + L - 1) / L;
            for (int64_t q = 0; q < ng; ++q) {
              for (int l0 = 0; l0 < L; ++l0) {
                const int64_t n = q * L + l0;
                float* dst = gb + q * B * VW + l0 * B;
                if (n < nt) {
                  const float* gr = gs + n * B;
                  for (int p = 0; p < B; ++p)
                    for (int c = 0; c < B; ++c) dst[p * VW + c] = gr[p];
                } else {
                  for (int p = 0; p < B; ++p)
                    for (int c = 0; c < B; ++c) dst[p * VW + c] = 0.0f;
                }
              }
            }
            gp = gb;
          }
          for (int64_t blk = bptr[i]; blk < bptr[i + 1]; ++blk) {
            const int64_t j = bidx[blk];
            sddmm_block<B>(gp, xp + j * T * B, nt, G + blk * B * B, first);
          }
        }
      }
    }
  });
}

at::Tensor bsr_spmm(at::Tensor bptr, at::Tensor bidx, at::Tensor wt, at::Tensor x,
                    int64_t out_features, c10::optional<at::Tensor> bias) {
  check_csr(bptr, bidx);
  check_dense(x, "x");
  TORCH_CHECK(wt.dtype() == at::kFloat && wt.is_contiguous() && wt.dim() == 3,
              "blocks must be a contiguous float32 (nblocks, b, b) tensor");
  const int64_t B = wt.size(1);
  const int64_t NBR = bptr.size(0) - 1, N = x.size(0), K = x.size(1);
  TORCH_CHECK(NBR * B == out_features, "block_row_ptr does not match out_features");
  const float* bp = bias_data(bias, out_features);
  auto y = alloc_output({N, out_features}, false);
  if (N == 0 || out_features == 0) return y;
  TORCH_CHECK(B == 4 || B == 8 || B == 16, "block size must be 4, 8 or 16");
  const int64_t* p = bptr.data_ptr<int64_t>();
  const float* w = wt.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_indices(bidx, [&](const auto* c) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(c)>>;
    switch (B) {
      case 16: bsr_spmm_impl<16, I>(p, c, w, NBR, xp, N, K, yp, bp); break;
      case 8: bsr_spmm_impl<8, I>(p, c, w, NBR, xp, N, K, yp, bp); break;
      default: bsr_spmm_impl<4, I>(p, c, w, NBR, xp, N, K, yp, bp); break;
    }
  });
  return y;
}

at::Tensor bsr_sddmm(at::Tensor bptr, at::Tensor bidx, at::Tensor gy, at::Tensor x, int64_t B) {
  check_csr(bptr, bidx);
  check_dense(gy, "grad_y");
  check_dense(x, "x");
  const int64_t NBR = bptr.size(0) - 1, N = x.size(0), K = x.size(1);
  const int64_t nb = bidx.size(0);
  TORCH_CHECK(gy.size(1) == NBR * B && gy.size(0) == N,
              "grad_y does not match the block structure");
  TORCH_CHECK(B > 0 && K % B == 0, "x.shape[1] must be a multiple of the block size");
  // Every block is written by the kernel (first batch tile) when N > 0.
  if (nb == 0 || N == 0) return at::zeros({nb, B, B}, x.options());
  auto G = at::empty({nb, B, B}, x.options());
  TORCH_CHECK(B == 4 || B == 8 || B == 16, "block size must be 4, 8 or 16");
  const int64_t* p = bptr.data_ptr<int64_t>();
  const float* g = gy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* o = G.data_ptr<float>();
  with_indices(bidx, [&](const auto* c) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(c)>>;
    switch (B) {
      case 16: bsr_sddmm_impl<16, I>(p, c, NBR, g, xp, N, K, o); break;
      case 8: bsr_sddmm_impl<8, I>(p, c, NBR, g, xp, N, K, o); break;
      default: bsr_sddmm_impl<4, I>(p, c, NBR, g, xp, N, K, o); break;
    }
  });
  return G;
}

// ---------------------------------------------------------------- topology bookkeeping

// The index structures of a layer whose stored set B changes (alwayssparse.backends.sparse,
// _Topology), in one merge of the old and the new sorted units instead of searches per changed
// unit: O(|B| + capacity + grid rows + grid columns).
//
//   old_units, old_order   B before: units ascending (int64) and the slot of each (int64)
//   new_units, new_in_a    B after: units ascending (int64), and whether each is in A (bool)
//   slot_units, slot_in_a  the layer's per-slot buffers (unit or -1, A flag), updated in place:
//                          units leaving B free their slots, entering units take the lowest free
//                          slots in unit order, survivors keep theirs
//
// Runs without the GIL (Top-KAST refreshes layers on several threads).
// Returns {order, b_ptr, b_cols, a_units, a_slots, a_ptr, a_cols, t_ptr, t_rows, t_slots,
// entered_units, entered_slots, left_units, left_slots}: B's slots and CSR over the grid rows,
// A's units, slots and CSR, A's CSC (rows ascending within a column, with the slot of each),
// and what entered and left B (units ascending, with their slots). Columns and rows have the
// dtype of slot_units. Every argument is checked before anything is written.
template <typename I>
std::vector<at::Tensor> topology_update_impl(const at::Tensor& old_units,
                                             const at::Tensor& old_order,
                                             const at::Tensor& new_units,
                                             const at::Tensor& new_in_a, at::Tensor& slot_units,
                                             at::Tensor& slot_in_a, int64_t R, int64_t C) {
  const int64_t nb = old_units.size(0), nn = new_units.size(0), cap = slot_units.size(0);
  const int64_t* ou = old_units.data_ptr<int64_t>();
  const int64_t* oo = old_order.data_ptr<int64_t>();
  const int64_t* nu = new_units.data_ptr<int64_t>();
  const bool* na = new_in_a.data_ptr<bool>();
  I* su = slot_units.data_ptr<I>();
  bool* sa = slot_in_a.data_ptr<bool>();
  for (int64_t j = 0; j < nn; ++j) {
    TORCH_CHECK(nu[j] >= 0 && nu[j] < R * C, "new units must lie in the grid [0, ", R * C, ")");
    TORCH_CHECK(j == 0 || nu[j] > nu[j - 1], "new units must be strictly ascending");
  }
  TORCH_CHECK(nn <= cap, nn, " units in B exceed the capacity ", cap);
  auto opt = old_units.options();
  auto iopt = slot_units.options();
  at::Tensor order = at::empty({nn}, opt);
  int64_t* od = order.data_ptr<int64_t>();
  std::vector<int64_t> entered_pos, left_units, left_slots;
  int64_t i = 0, j = 0;
  while (i < nb && j < nn) {
    const int64_t was = ou[i], now = nu[j];
    if (was == now) {  // most units stay: the one well-predicted case
      od[j++] = oo[i++];
    } else if (was < now) {
      left_units.push_back(was);
      left_slots.push_back(oo[i++]);
    } else {
      entered_pos.push_back(j);
      od[j++] = -1;
    }
  }
  for (; i < nb; ++i) {
    left_units.push_back(ou[i]);
    left_slots.push_back(oo[i]);
  }
  for (; j < nn; ++j) {
    entered_pos.push_back(j);
    od[j] = -1;
  }
  for (int64_t s : left_slots) {
    su[s] = static_cast<I>(-1);
    sa[s] = false;
  }
  const int64_t ne = static_cast<int64_t>(entered_pos.size());
  at::Tensor entered_units = at::empty({ne}, opt), entered_slots = at::empty({ne}, opt);
  int64_t* eu = entered_units.data_ptr<int64_t>();
  int64_t* es = entered_slots.data_ptr<int64_t>();
  int64_t free_slot = 0;
  for (int64_t e = 0; e < ne; ++e) {
    // Skip 16 occupied slots at a time (no slot below free_slot is free; an OR of 16 slot units
    // is negative when one of them is).
    while (free_slot + 16 <= cap) {
      I any = 0;
      for (int q = 0; q < 16; ++q) any |= su[free_slot + q];
      if (any < 0) break;
      free_slot += 16;
    }
    while (free_slot < cap && su[free_slot] >= 0) ++free_slot;
    TORCH_CHECK(free_slot < cap, "no free slot: the slot buffers disagree with old_units");
    const int64_t p = entered_pos[e];
    eu[e] = nu[p];
    es[e] = free_slot;
    od[p] = free_slot;
    su[free_slot] = static_cast<I>(nu[p]);
    ++free_slot;
  }
  int64_t na_count = 0;
  for (int64_t k = 0; k < nn; ++k) {
    sa[od[k]] = na[k];
    na_count += na[k] ? 1 : 0;
  }
  at::Tensor b_ptr = at::zeros({R + 1}, opt), b_cols = at::empty({nn}, iopt);
  at::Tensor a_ptr = at::zeros({R + 1}, opt), t_ptr = at::zeros({C + 1}, opt);
  at::Tensor a_units = at::empty({na_count}, opt), a_slots = at::empty({na_count}, opt);
  at::Tensor a_cols = at::empty({na_count}, iopt), t_rows = at::empty({na_count}, iopt);
  at::Tensor t_slots = at::empty({na_count}, opt);
  int64_t *bp = b_ptr.data_ptr<int64_t>(), *ap = a_ptr.data_ptr<int64_t>();
  int64_t *tp = t_ptr.data_ptr<int64_t>(), *au = a_units.data_ptr<int64_t>();
  int64_t *as = a_slots.data_ptr<int64_t>(), *ts = t_slots.data_ptr<int64_t>();
  I *bc = b_cols.data_ptr<I>(), *ac = a_cols.data_ptr<I>(), *tr = t_rows.data_ptr<I>();
  // Branch-free compaction of A (its flags are random): every unit is written at the next
  // place, which only a unit of A then claims.
  // Row pointers are written where a row starts (units ascend: no division per unit, and no
  // per-unit increment of a row's count, which would wait on its own store every time).
  int64_t a = 0, row = 0, row_start = 0;
  for (int64_t k = 0; k < nn; ++k) {
    while (nu[k] >= row_start + C) {
      ++row;
      row_start += C;
      bp[row] = k;
      ap[row] = a;
    }
    const int64_t col = nu[k] - row_start, in = na[k];
    bc[k] = static_cast<I>(col);
    tp[col + 1] += in;
    if (a < na_count) {
      au[a] = nu[k];
      as[a] = od[k];
      ac[a] = static_cast<I>(col);
    }
    a += in;
  }
  for (++row; row <= R; ++row) {
    bp[row] = nn;
    ap[row] = a;
  }
  for (int64_t c = 0; c < C; ++c) tp[c + 1] += tp[c];
  std::vector<int64_t> fill(tp, tp + C);
  for (int64_t r = 0; r < R; ++r) {  // row-major: rows ascend within each column
    for (int64_t k = ap[r]; k < ap[r + 1]; ++k) {
      const int64_t d = fill[ac[k]]++;
      tr[d] = static_cast<I>(r);
      ts[d] = as[k];
    }
  }
  const int64_t nl = static_cast<int64_t>(left_units.size());
  at::Tensor lu = at::empty({nl}, opt), ls = at::empty({nl}, opt);
  if (nl) {
    std::memcpy(lu.data_ptr<int64_t>(), left_units.data(), nl * sizeof(int64_t));
    std::memcpy(ls.data_ptr<int64_t>(), left_slots.data(), nl * sizeof(int64_t));
  }
  return {order, b_ptr, b_cols, a_units, a_slots, a_ptr, a_cols, t_ptr, t_rows, t_slots,
          entered_units, entered_slots, lu, ls};
}

std::vector<at::Tensor> topology_update(at::Tensor old_units, at::Tensor old_order,
                                        at::Tensor new_units, at::Tensor new_in_a,
                                        at::Tensor slot_units, at::Tensor slot_in_a, int64_t R,
                                        int64_t C) {
  for (const at::Tensor* t : {&old_units, &old_order, &new_units}) {
    TORCH_CHECK(t->dtype() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    t->device().is_cpu(),
                "units and slots must be contiguous int64 vectors on the CPU");
  }
  TORCH_CHECK(old_order.size(0) == old_units.size(0), "old_order must match old_units");
  TORCH_CHECK(new_in_a.dtype() == at::kBool && new_in_a.is_contiguous() &&
                  new_in_a.size(0) == new_units.size(0),
              "new_in_a must be a contiguous bool vector of the size of new_units");
  TORCH_CHECK(slot_units.dtype() == at::kInt || slot_units.dtype() == at::kLong,
              "slot_units must be int32 or int64");
  TORCH_CHECK(slot_units.is_contiguous() && slot_in_a.is_contiguous() &&
                  slot_in_a.dtype() == at::kBool && slot_in_a.size(0) == slot_units.size(0),
              "slot buffers must be contiguous, slot_in_a bool of the size of slot_units");
  TORCH_CHECK(R > 0 && C > 0, "the grid must not be empty");
  if (slot_units.dtype() == at::kInt) {
    return topology_update_impl<int32_t>(old_units, old_order, new_units, new_in_a, slot_units,
                                         slot_in_a, R, C);
  }
  return topology_update_impl<int64_t>(old_units, old_order, new_units, new_in_a, slot_units,
                                       slot_in_a, R, C);
}

// ---------------------------------------------------------------- Top-KAST's incremental refresh

// One incremental selection of Top-KAST (alwayssparse.ranking, RankedReservoir.select with
// rank_keys and the per-unit bookkeeping of the refresh) in a few sequential passes.
//
// A unit's key is its float32 score's bits (scores >= 0 order like their bits) above the
// bit-inverted position, so that a larger key means a larger score, or the same score and the
// lower position. The new B is the top count_b of (B's units) and (the reservoir C, whose best
// units are the ascending frontier; every other unit of C ranks below floor, -1: none), the new
// A the top count_a of the new B.
//
//   scores, positions, in_a   B's units: scores (float32), positions (int64, strictly
//                             ascending), A's flags
//   frontier, frontier_length C's best keys, ascending: the first frontier_length of a buffer
//
// Returns {status} with status 1 when the known part of C does not decide the selection (a unit
// below the floor might enter) and 2 when a score is negative or NaN (no key), nothing written;
// else {status 0, the frontier's buffer (the same one, updated in place, when it holds the new
// frontier), B's units after, their A flags, entered, left, entered A, left A (positions
// ascending), the new frontier's length}.
inline int64_t key_position(int64_t key) {
  constexpr int64_t mask = (int64_t{1} << 32) - 1;
  return mask - (key & mask);
}

// A scratch buffer of at least `size` entries that only grows (kept between calls, per thread):
// resizing a vector to a larger size zero-fills the new entries, at every call when the sizes of
// successive calls alternate (the layers of a model).
template <class T>
T* grown(std::vector<T>& v, size_t size) {
  if (v.size() < size) v.resize(size);
  return v.data();
}

// The k-th largest key (1 <= k <= how many there are) of keys[i] for i < n with sel(i), and of
// extra[0 .. n_extra): a histogram of the keys' top 12 bits (a score's exponent and 4 mantissa
// bits: keys are below 2^63), then a selection among the keys of the one bucket that holds it.
// Two branch-free passes instead of std::nth_element over every key (about 4x faster at 10^5).
template <class Sel>
int64_t kth_largest_where(const int64_t* keys, int64_t n, Sel&& sel, const int64_t* extra,
                          int64_t n_extra, int64_t k) {
  constexpr int shift = 51, buckets = 1 << 12;
  static thread_local std::vector<int64_t> hist, bucket;  // scratch kept between calls
  hist.assign(buckets, 0);
  for (int64_t i = 0; i < n; ++i) hist[keys[i] >> shift] += sel(i);
  for (int64_t f = 0; f < n_extra; ++f) hist[extra[f] >> shift] += 1;
  int64_t above = 0, b = buckets - 1;
  while (above + hist[b] < k) above += hist[b--];
  bucket.resize(hist[b] + 1);  // one spare place for the branch-free writes
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    bucket[m] = keys[i];
    m += sel(i) & ((keys[i] >> shift) == b);
  }
  for (int64_t f = 0; f < n_extra; ++f) {
    bucket[m] = extra[f];
    m += (extra[f] >> shift) == b;
  }
  const int64_t r = k - above;  // 1 <= r <= m
  std::nth_element(bucket.begin(), bucket.begin() + (r - 1), bucket.begin() + m,
                   std::greater<int64_t>());
  return bucket[r - 1];
}

// Sorts a[0 .. n) ascending by bits [0, bits) (every higher bit is zero): LSD radix sort, 11
// bits a pass, a pass skipped when all entries share its digit; std::sort below 512 entries.
// About 5x std::sort on the 10^4-entry lists of a refresh.
void radix_sort(std::vector<uint64_t>& a, int bits) {
  const size_t n = a.size();
  if (n < 512) {
    std::sort(a.begin(), a.end());
    return;
  }
  constexpr int digit = 11, radix = 1 << digit;
  static thread_local std::vector<uint64_t> tmp;
  tmp.resize(n);
  size_t count[radix];
  for (int shift = 0; shift < bits; shift += digit) {
    std::fill(count, count + radix, size_t{0});
    for (size_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & (radix - 1)];
    if (count[(a[0] >> shift) & (radix - 1)] == n) continue;  // one digit: nothing moves
    size_t sum = 0;
    for (int d = 0; d < radix; ++d) {
      const size_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) tmp[count[(a[i] >> shift) & (radix - 1)]++] = a[i];
    a.swap(tmp);
  }
}

std::vector<at::Tensor> topkast_select(at::Tensor scores, at::Tensor positions, at::Tensor in_a,
                                       at::Tensor frontier, int64_t frontier_length,
                                       int64_t floor, int64_t count_b, int64_t count_a) {
  TORCH_CHECK(scores.dtype() == at::kFloat && scores.dim() == 1 && scores.is_contiguous(),
              "scores must be a contiguous float32 vector");
  const int64_t n = scores.size(0);
  TORCH_CHECK(positions.dtype() == at::kLong && positions.is_contiguous() &&
                  positions.dim() == 1 && positions.size(0) == n,
              "positions must be a contiguous int64 vector of the size of scores");
  TORCH_CHECK(in_a.dtype() == at::kBool && in_a.is_contiguous() && in_a.dim() == 1 &&
                  in_a.size(0) == n,
              "in_a must be a contiguous bool vector of the size of scores");
  TORCH_CHECK(frontier.dtype() == at::kLong && frontier.is_contiguous() && frontier.dim() == 1,
              "frontier must be a contiguous int64 vector");
  TORCH_CHECK(frontier_length >= 0 && frontier_length <= frontier.size(0),
              "frontier_length must lie in [0, frontier.size(0)]");
  TORCH_CHECK(count_a >= 0 && count_b >= count_a, "need 0 <= count_a <= count_b");
  auto opt = positions.options();
  auto status = [&](int64_t code) { return std::vector<at::Tensor>{at::full({}, code, opt)}; };
  const float* sc = scores.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const bool* ia = in_a.data_ptr<bool>();
  int64_t* fr = frontier.data_ptr<int64_t>();
  const int64_t F = frontier_length;
  static thread_local std::vector<int64_t> key_buf;
  int64_t* keys = grown(key_buf, n);
  bool keyed = true, ascending = true;
  for (int64_t i = 0; i < n; ++i) {  // branch-free: the checks are folded into two flags
    const float v = sc[i] + 0.0f;    // -0.0 + 0.0 is +0.0
    keyed &= v >= 0.0f;              // false for negative scores and NaN
    ascending &= (i == 0 || pos[i] > pos[i - 1]);
    int32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    keys[i] = (static_cast<int64_t>(bits) << 32) | ((int64_t{1} << 32) - 1 - pos[i]);
  }
  TORCH_CHECK(ascending, "positions must be strictly ascending");
  TORCH_CHECK(n == 0 || (pos[0] >= 0 && pos[n - 1] < (int64_t{1} << 32)),
              "positions must lie in [0, 2^32)");
  if (!keyed) return status(2);
  const int64_t tau = F ? fr[F - 1] : floor;
  int64_t q = 0;
  for (int64_t i = 0; i < n; ++i) q += keys[i] > tau;
  // B: every unit with a key >= tb (a C unit: among the frontier's best `taken`).
  int64_t tb = INT64_MAX, taken = 0;
  const int64_t* kv = keys;
  if (q >= count_b) {
    if (count_b > 0) {
      tb = kth_largest_where(kv, n, [&](int64_t i) { return int64_t{kv[i] > tau}; }, nullptr, 0,
                             count_b);
    }
  } else {
    // The q units above tau stay; the other places go to the best of (B's units at most tau)
    // and (the frontier's best `known`).
    const int64_t places = count_b - q, known = std::min(places, F);
    if (n - q + known < places) return status(1);
    tb = kth_largest_where(kv, n, [&](int64_t i) { return int64_t{kv[i] <= tau}; },
                           fr + F - known, known, places);
    if (floor >= 0 && tb <= floor) return status(1);  // a unit below the floor might outrank it
    while (taken < known && fr[F - 1 - taken] >= tb) ++taken;
  }
  // A: the top count_a of the new B = (B's units with keys >= tb) + (entering: fr[F - taken ..
  // F)), or all of it.
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) kept += keys[i] >= tb;
  int64_t ta = INT64_MIN;
  if (count_a == 0) {
    ta = INT64_MAX;
  } else if (count_a < kept + taken) {
    ta = kth_largest_where(kv, n, [&](int64_t i) { return int64_t{kv[i] >= tb}; }, fr + F - taken,
                           taken, count_a);
  }
  // Entering units in position order, with their A flags.
  // Sorted as single integers, position above the index into the frontier (both below 2^32).
  std::vector<uint64_t> by_position(taken);
  for (int64_t f = 0; f < taken; ++f) {
    by_position[f] = (static_cast<uint64_t>(key_position(fr[F - 1 - f])) << 32) | uint64_t(f);
  }
  radix_sort(by_position, 64);
  std::vector<int64_t> entering(taken), entering_key(taken);
  for (int64_t f = 0; f < taken; ++f) {
    entering[f] = static_cast<int64_t>(by_position[f] >> 32);
    entering_key[f] = fr[F - 1 - static_cast<int64_t>(by_position[f] & 0xffffffffu)];
  }
  // The frontier loses the entering units (its last `taken`) and gains the leaving ones above
  // the floor: merged from the back, in place when the buffer holds the result (the leaving
  // units ranked high, so little of the frontier moves), else into a new buffer with room.
  static thread_local std::vector<uint64_t> drop_buf;
  uint64_t* leaving = grown(drop_buf, n + 1);
  size_t nd_found = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free compaction: leaving units are random
    leaving[nd_found] = static_cast<uint64_t>(keys[i]);
    nd_found += (keys[i] < tb) & (floor < 0 || keys[i] > floor);
  }
  std::vector<uint64_t> dropped(leaving, leaving + nd_found);
  radix_sort(dropped, 63);  // keys are below 2^63
  const int64_t remaining = F - taken, nd = static_cast<int64_t>(dropped.size());
  const int64_t length = remaining + nd;
  at::Tensor new_frontier = frontier;
  if (length > frontier.size(0)) {
    new_frontier = at::empty({length + length / 4 + 1024}, opt);
    std::memcpy(new_frontier.data_ptr<int64_t>(), fr, remaining * sizeof(int64_t));
  }
  int64_t* out = new_frontier.data_ptr<int64_t>();
  for (int64_t w = length, unread = remaining, b = nd - 1; b >= 0; --b) {
    // The frontier's keys above dropped[b] move up in one block, then dropped[b] goes below;
    // the block's start is found by galloping down from the unread end (the gaps are short).
    int64_t lo = unread, step = 1;
    const int64_t d = static_cast<int64_t>(dropped[b]);
    while (lo > 0 && out[lo - 1] > d) {
      const int64_t next = std::max<int64_t>(0, lo - step);
      if (out[next] > d) {
        lo = next;
        step *= 2;
      } else {
        lo = std::upper_bound(out + next, out + lo, d) - out;
        break;
      }
    }
    const int64_t above = lo;
    w -= unread - above;
    std::memmove(out + w, out + above, (unread - above) * sizeof(int64_t));
    unread = above;
    out[--w] = d;
  }
  const int64_t nb = kept + taken;
  // B's units that stay, with their A flags, and the units leaving B, leaving A and entering A
  // from B\A: branch-free compactions (every one is written at the next place of its list,
  // which only an entry of that list then claims; one spare place each) into scratch buffers
  // that only grow.
  static thread_local std::vector<int64_t> kept_buf, left_buf, left_a_buf, entered_b_buf;
  static thread_local std::vector<uint8_t> kept_flag_buf;
  int64_t* __restrict kept_units = grown(kept_buf, n + 1);
  int64_t* __restrict left = grown(left_buf, n + 1);
  int64_t* __restrict left_a = grown(left_a_buf, n + 1);
  int64_t* __restrict entered_a_b = grown(entered_b_buf, n + 1);
  uint8_t* __restrict kept_flags = grown(kept_flag_buf, n + 1);
  int64_t k = 0, nl = 0, nla = 0, nea = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pos[i], was_a = ia[i], key = kv[i];
    const int64_t stays_b = key >= tb, a_after = stays_b & (key >= ta);
    kept_units[k] = p;
    kept_flags[k] = static_cast<uint8_t>(a_after);
    k += stays_b;
    left[nl] = p;
    nl += !stays_b;
    left_a[nla] = p;
    nla += was_a & !a_after;
    entered_a_b[nea] = p;
    nea += !was_a & a_after;
  }
  // B after: the kept units with the entering ones (few) inserted, each after the run of kept
  // units below it (one well-predicted copy loop per run; the sentinel ends the last).
  kept_units[k] = INT64_MAX;
  at::Tensor units = at::empty({nb}, opt), flags = at::empty({nb}, in_a.options());
  at::Tensor entered = at::empty({taken}, opt);
  int64_t* __restrict u = units.data_ptr<int64_t>();
  uint8_t* __restrict fl = reinterpret_cast<uint8_t*>(flags.data_ptr<bool>());
  std::vector<int64_t> entered_a_c;  // entering units that enter A, ascending
  int64_t i = 0, j = 0;
  for (int64_t e = 0; e < taken; ++e) {
    const int64_t next = entering[e];
    for (; kept_units[i] < next; ++i, ++j) {
      u[j] = kept_units[i];
      fl[j] = kept_flags[i];
    }
    const bool a_after = entering_key[e] >= ta;
    u[j] = next;
    fl[j++] = a_after;
    if (a_after) entered_a_c.push_back(next);
  }
  for (; i < k; ++i, ++j) {
    u[j] = kept_units[i];
    fl[j] = kept_flags[i];
  }
  auto vec = [&](const int64_t* v, int64_t size) {
    at::Tensor t = at::empty({size}, opt);
    if (size) std::memcpy(t.data_ptr<int64_t>(), v, size * sizeof(int64_t));
    return t;
  };
  at::Tensor entered_a = at::empty({nea + static_cast<int64_t>(entered_a_c.size())}, opt);
  std::merge(entered_a_b, entered_a_b + nea, entered_a_c.begin(), entered_a_c.end(),
             entered_a.data_ptr<int64_t>());  // both ascending
  if (taken) std::memcpy(entered.data_ptr<int64_t>(), entering.data(), taken * sizeof(int64_t));
  return {at::full({}, int64_t{0}, opt), new_frontier, units, flags, entered, vec(left, nl),
          entered_a, vec(left_a, nla), at::full({}, length, opt)};
}

// An operand of the element-wise passes below: a contiguous CPU tensor of `dtype` with `numel`
// entries.
void check_flat(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu() &&
                  t.numel() == numel,
              name, " must be a contiguous ", dtype, " tensor on the CPU with ", numel,
              " entries");
}

// Whether values (float32) is nonzero anywhere mask (bool, same size) is false (the masked
// backend's check that no gradient reached theta outside B). An OR over the bits without the
// sign (so -0.0 counts as zero, NaN as nonzero) of the entries outside the mask: branch-free and
// vectorized, on torch's pool, chunks of 64 Ki entries; a chunk that finds one stops the others
// at their next chunk.
bool any_nonzero_outside(at::Tensor values, at::Tensor mask) {
  check_flat(values, at::kFloat, values.numel(), "values");
  check_flat(mask, at::kBool, values.numel(), "mask");
  const uint32_t* v = reinterpret_cast<const uint32_t*>(values.data_ptr<float>());
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int64_t n = values.numel();
  constexpr int64_t chunk = 1 << 16;
  std::atomic<bool> found{false};
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e && !found.load(std::memory_order_relaxed); ++k) {
      const int64_t lo = k * chunk, hi = std::min(n, lo + chunk);
      uint32_t hit = 0;
      for (int64_t i = lo; i < hi; ++i) hit |= v[i] & 0x7fffffffu & (uint32_t(m[i]) - 1u);
      if (hit) found.store(true, std::memory_order_relaxed);
    }
  });
  return found.load();
}

// out = where(mask, x, other), or where(mask, x, 0) without other: float32 and bool, contiguous,
// one size; out may be x or other (element-wise, so in place is safe). torch.where on the CPU
// is about 14x a copy's time on a random mask (a mispredicted branch per entry); this loop is
// branch-free and vectorized, on torch's pool in chunks of 64 Ki entries.
void masked_where(at::Tensor mask, at::Tensor x, c10::optional<at::Tensor> other, at::Tensor out) {
  const int64_t n = mask.numel();
  check_flat(mask, at::kBool, n, "mask");
  check_flat(x, at::kFloat, n, "x");
  check_flat(out, at::kFloat, n, "out");
  if (other.has_value()) check_flat(*other, at::kFloat, n, "other");
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  // Selected on the bits (a mask of all ones or zeros per entry): no branch to mispredict on a
  // random mask, and exact (+0.0 outside, NaN and infinities kept), unlike x * mask.
  const uint32_t* xv = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  const uint32_t* ov =
      other.has_value() ? reinterpret_cast<const uint32_t*>(other->data_ptr<float>()) : nullptr;
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<float>());
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    if (ov == nullptr) {
      for (int64_t i = begin; i < end; ++i) dst[i] = xv[i] & (0u - uint32_t(m[i]));
    } else {
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t keep = 0u - uint32_t(m[i]);
        dst[i] = (xv[i] & keep) | (ov[i] & ~keep);
      }
    }
  });
}

// sum_i c[i] * w[i]^2 ("l2") or sum_i c[i] * |w[i]| ("l1"): one pass, accumulated in double over
// fixed chunks of 64 Ki entries that are then added in order, so the result does not depend on
// the number of threads.
double weighted_norm(at::Tensor w, at::Tensor c, bool l1) {
  check_flat(w, at::kFloat, w.numel(), "weight");
  check_flat(c, at::kFloat, w.numel(), "coefficients");
  const float* wv = w.data_ptr<float>();
  const float* cv = c.data_ptr<float>();
  const int64_t n = w.numel();
  constexpr int64_t chunk = 1 << 16;
  std::vector<double> part((n + chunk - 1) / chunk, 0.0);
  at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t lo = k * chunk, hi = std::min(n, lo + chunk);
      // Eight independent sums (one vector of doubles): a single running sum would wait on the
      // add latency at every entry.
      double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t i = lo;
      for (; i + 8 <= hi; i += 8) {
        for (int j = 0; j < 8; ++j) {
          const double x = wv[i + j];
          acc[j] += double(cv[i + j]) * (l1 ? std::fabs(x) : x * x);
        }
      }
      for (; i < hi; ++i) {
        const double x = wv[i];
        acc[0] += double(cv[i]) * (l1 ? std::fabs(x) : x * x);
      }
      double sum = 0.0;
      for (double a : acc) sum += a;
      part[k] = sum;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

// The gradient of scale * weighted_norm: (scale * c[i]) * w[i] ("l2", scale = 2 * upstream
// gradient) or (scale * c[i]) * sign(w[i]) ("l1"), in float32 in that order (as torch computes
// (scale * c) * w).
at::Tensor weighted_norm_grad(at::Tensor w, at::Tensor c, double scale, bool l1) {
  check_flat(w, at::kFloat, w.numel(), "weight");
  check_flat(c, at::kFloat, w.numel(), "coefficients");
  at::Tensor out = at::empty_like(w);
  const float* wv = w.data_ptr<float>();
  const float* cv = c.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float k = static_cast<float>(scale);
  at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    if (l1) {
      for (int64_t i = b; i < e; ++i) {
        const float sign = float(wv[i] > 0.0f) - float(wv[i] < 0.0f);
        o[i] = (k * cv[i]) * sign;
      }
    } else {
      for (int64_t i = b; i < e; ++i) o[i] = (k * cv[i]) * wv[i];
    }
  });
  return out;
}

// Top-KAST's regulariser coefficients: 1 on A, 1 / density on B \ A, 0 elsewhere (float32), from
// A's and B's bool masks in one branch-free pass; the same bits as torch's
// A.float() + (B & ~A).float() / density.
at::Tensor topkast_coefficients(at::Tensor a, at::Tensor b, double density) {
  check_flat(a, at::kBool, a.numel(), "forward mask");
  check_flat(b, at::kBool, a.numel(), "gradient mask");
  TORCH_CHECK(density > 0.0, "density must be positive");
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  const uint8_t* av = reinterpret_cast<const uint8_t*>(a.data_ptr<bool>());
  const uint8_t* bv = reinterpret_cast<const uint8_t*>(b.data_ptr<bool>());
  float* o = out.data_ptr<float>();
  const float inverse = 1.0f / static_cast<float>(density);
  at::parallel_for(0, a.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      o[i] = float(av[i]) + float(bv[i] & (av[i] ^ 1u)) * inverse;
    }
  });
  return out;
}

int64_t num_threads() { return at::get_num_threads(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("csr_spmm", &csr_spmm, "y = x @ S^T (+ bias) for CSR S (feature-major kernel)",
        py::arg("ptr"), py::arg("idx"), py::arg("val"), py::arg("x"), py::arg("rows"),
        py::arg("nt"), py::arg("bias") = py::none());
  m.def("csr_sddmm", &csr_sddmm, "sampled dense-dense product at CSR positions");
  m.def("compressed_transpose", &compressed_transpose, "CSR -> CSC pattern with permutation");
  m.def("bsr_spmm", &bsr_spmm, "y = x @ W^T (+ bias) for BSR W given transposed blocks",
        py::arg("ptr"), py::arg("idx"), py::arg("blocks_t"), py::arg("x"),
        py::arg("out_features"), py::arg("bias") = py::none());
  m.def("bsr_sddmm", &bsr_sddmm, "sampled block gradient");
  m.def("topology_update", &topology_update, py::call_guard<py::gil_scoped_release>(),
        "a sparse layer's index structures after its stored units change (one merge)");
  m.def("topkast_select", &topkast_select, py::call_guard<py::gil_scoped_release>(),
        "Top-KAST's incremental selection of B and A from B's scores and the ranked reservoir");
  m.def("any_nonzero_outside", &any_nonzero_outside,
        py::call_guard<py::gil_scoped_release>(),
        "whether float32 values are nonzero anywhere a bool mask is false");
  m.def("masked_where", &masked_where, py::call_guard<py::gil_scoped_release>(),
        "out = where(mask, x, other or 0) for float32 on the CPU (vectorized)", py::arg("mask"),
        py::arg("x"), py::arg("other"), py::arg("out"));
  m.def("weighted_norm", &weighted_norm, py::call_guard<py::gil_scoped_release>(),
        "sum of c * w^2 (or c * |w| with l1) in double");
  m.def("weighted_norm_grad", &weighted_norm_grad, py::call_guard<py::gil_scoped_release>(),
        "(scale * c) * w (or (scale * c) * sign(w) with l1)");
  m.def("topkast_coefficients", &topkast_coefficients,
        py::call_guard<py::gil_scoped_release>(),
        "1 on A, 1 / density on B \\ A, 0 elsewhere (float32) from two bool masks");
  m.def("num_threads", &num_threads, "at::get_num_threads() seen by the extension");
}
