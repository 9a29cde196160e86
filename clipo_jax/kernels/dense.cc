// x [M, K] @ W [K, N] on the CPU with W packed in column panels, shared out over XLA's intra-op
// thread pool: the sampler's dense layers (QKV, O, MLP, LM head) at every batch size.
//
// Why packed: a decode step at M = batch streams every weight from memory once. Read in place, a
// 16-float slice of W's row k sits N floats away from row k+1's, so each k step touches a new page
// and the hardware prefetchers fall behind; XLA:CPU's dots run well below the FMA peak there. In a
// panel [K, P] (P = 16, 32 or 48 columns, contiguous) the stream is sequential, and the first
// row block prefetches a few rows ahead, so reading W overlaps the arithmetic. The packing
// (`clipo_jax.kernels.pack_dense`) is one transpose per sampler call.
//
// Work: each panel is one unit (its rows in blocks, so the panel stays in L2 while the blocks after
// the first reuse it). Register blocks: with AVX-512 (32 registers of 16 floats) 8 rows x 3
// vectors = 24 accumulators, the panel's vectors loaded once per k for all rows; without it
// (AVX2: 16 registers of 8 floats) 2 rows x up to 6 vectors = 12 accumulators, the rows'
// broadcasts held and each panel vector loaded once for both rows (15 registers).
#include <algorithm>
#include <cstdint>

#include "units.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
typedef float fv __attribute__((vector_size(64)));
typedef float fu __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores
constexpr int64_t kLanes = 16;
constexpr int64_t kRows = 8;
constexpr bool kWeightsFirst = true;  // load the NV panel vectors, then each row's broadcast
#else
typedef float fv __attribute__((vector_size(32)));
typedef float fu __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;
constexpr int64_t kRows = 2;
constexpr bool kWeightsFirst = false;  // hold the rows' broadcasts, load each panel vector once
#endif
constexpr int64_t kPrefetchRows = 16;  // how far ahead of row k the first row block prefetches

inline fv Load(const float* p) { return *reinterpret_cast<const fu*>(p); }
inline void Store(float* p, fv x) { *reinterpret_cast<fu*>(p) = x; }

// c[MR, NV*kLanes] = a[MR, K] @ w[K, NV*kLanes] (w: one panel, rows NV*kLanes floats apart; c: rows
// N apart).
template <int MR, int NV, bool kPrefetch>
inline void Block(const float* a, int64_t K, const float* w, float* c, int64_t N) {
  constexpr int64_t P = NV * kLanes;
  fv acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NV; ++j) acc[i][j] = fv{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * P;
    if (kPrefetch) {  // one prefetch per 64-byte line
#pragma GCC unroll 6
      for (int j = 0; j < NV; j += 16 / kLanes) __builtin_prefetch(wk + kPrefetchRows * P + j * kLanes);
    }
    if constexpr (kWeightsFirst) {
      fv wv[NV];
#pragma GCC unroll 6
      for (int j = 0; j < NV; ++j) wv[j] = Load(wk + j * kLanes);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const fv ai = a[i * K + k] - fv{};  // broadcast (x - 0 is x, so no add is emitted)
#pragma GCC unroll 6
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * wv[j];
      }
    } else {
      fv ai[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) ai[i] = a[i * K + k] - fv{};
#pragma GCC unroll 6
      for (int j = 0; j < NV; ++j) {
        const fv wj = Load(wk + j * kLanes);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) acc[i][j] += ai[i] * wj;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NV; ++j) Store(c + i * N + j * kLanes, acc[i][j]);
}

template <int NV, bool kPrefetch>
void Rows(int64_t rows, const float* a, int64_t K, const float* w, float* c, int64_t N) {
  switch (rows) {
#ifdef __AVX512F__
    case 8: return Block<8, NV, kPrefetch>(a, K, w, c, N);
    case 7: return Block<7, NV, kPrefetch>(a, K, w, c, N);
    case 6: return Block<6, NV, kPrefetch>(a, K, w, c, N);
    case 5: return Block<5, NV, kPrefetch>(a, K, w, c, N);
    case 4: return Block<4, NV, kPrefetch>(a, K, w, c, N);
    case 3: return Block<3, NV, kPrefetch>(a, K, w, c, N);
#endif
    case 2: return Block<2, NV, kPrefetch>(a, K, w, c, N);
    default: return Block<1, NV, kPrefetch>(a, K, w, c, N);
  }
}

template <int NV>
void Panel(const float* a, int64_t M, int64_t K, const float* w, float* c, int64_t N) {
  for (int64_t m = 0; m < M; m += kRows) {
    const int64_t rows = std::min(kRows, M - m);
    // only the first block reads the panel from memory; the others find it in L2
    m == 0 ? Rows<NV, true>(rows, a, K, w, c, N) : Rows<NV, false>(rows, a + m * K, K, w, c + m * N, N);
  }
}

struct Job {
  const float* a;  // [M, K]
  const float* w;  // [N / P, K, P]
  float* c;        // [M, N]
  int64_t M, K, N, P;
};

void RunUnit(const Job& j, int64_t u) {
  const float* w = j.w + u * j.K * j.P;
  float* c = j.c + u * j.P;
  j.P == 48   ? Panel<48 / kLanes>(j.a, j.M, j.K, w, c, j.N)
  : j.P == 32 ? Panel<32 / kLanes>(j.a, j.M, j.K, w, c, j.N)
              : Panel<16 / kLanes>(j.a, j.M, j.K, w, c, j.N);
}

ffi::Error Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2)
    return ffi::Error::InvalidArgument("dense: x must be [M, K], the packed weight [N / P, K, P]");
  const int64_t M = xd[0], K = xd[1], P = wd[2];
  if (P != 16 && P != 32 && P != 48)
    return ffi::Error::InvalidArgument("dense: the panel width must be 16, 32 or 48");
  if (wd[1] != K || od[0] != M || od[1] != wd[0] * P)
    return ffi::Error::InvalidArgument("dense: inconsistent shapes");
  const Job j{x.typed_data(), w.typed_data(), out->typed_data(), M, K, od[1], P};
  const int64_t units = wd[0];
  if (units == 0 || M == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(j.c, j.c + M * j.N, 0.0f);
    return ffi::Error::Success();
  }
  // a tiny product finishes before a woken thread would start
  const int64_t helpers = M * K * j.N < (int64_t{1} << 15) ? 0 : units;
  if (!clipo_kernels::RunUnits(pool, units, helpers, [&j](int64_t u) { RunUnit(j, u); }))
    return ffi::Error::Internal("dense: a unit of work failed");
  return ffi::Error::Success();
}

}  // namespace

// The vector path this library was built with (its -march): 512 = AVX-512 (both kernels' own
// width), 256 = AVX2 + FMA (the dense kernel's 8-float blocks; the decode kernel spills), 0 = neither.
extern "C" int ClipoKernelVectorBits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__) && defined(__FMA__)
  return 256;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ClipoDense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
