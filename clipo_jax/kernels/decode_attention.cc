// One decode step's attention on the CPU, shared out over XLA's intra-op thread pool.
//
// Each (row, kv head) pair is one unit of work: its G query heads against that pair's keys, kept
// transposed ([head_dim, S], the sampler's per-layer cache), and values ([S, head_dim]). XLA:CPU
// runs the same arithmetic as fusions on one thread. The arithmetic follows
// transformer._attention_einsum: float32 q.k, scale, tanh cap, position mask, max-subtracted
// softmax normalised by division, then p.v; a query with no allowed key gets zeros.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "units.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Step {
  const float* q;        // [B, K, G, D]
  const float* k;        // [B, K, D, S]
  const float* v;        // [B, K, S, D]
  const int32_t* k_pos;  // [B, S], -1 = empty slot
  const int32_t* q_pos;  // [B]
  float* out;            // [B, K, G, D]
  int64_t K, G, D, S;
  float scale, softcap;  // softcap <= 0: none
  int64_t window;        // a key at distance >= window is masked
};

// GCC/Clang vector extensions: 16 floats, compiled to AVX-512, AVX2 or SSE by -march=native.
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef float f16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores
constexpr int64_t kLanes = 16;

inline f16v Load(const float* p) { return *reinterpret_cast<const f16u*>(p); }
inline void Store(float* p, f16v x) { *reinterpret_cast<f16u*>(p) = x; }
inline f16v Splat(float x) { return f16v{} + x; }

// exp over 16 lanes: 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial (Cephes' expf).
inline f16v Exp(f16v x) {
  x = x > Splat(88.37f) ? Splat(88.37f) : x;  // NaN compares false: it stays NaN
  x = x < Splat(-87.33f) ? Splat(-87.33f) : x;
  const f16v fx = x * Splat(1.44269504088896341f) + Splat(0.5f);
  i16v n = __builtin_convertvector(fx, i16v);
  n = __builtin_convertvector(n, f16v) > fx ? n - 1 : n;  // floor
  const f16v nf = __builtin_convertvector(n, f16v);
  const f16v r = x - nf * Splat(0.693359375f) - nf * Splat(-2.12194440e-4f);
  f16v y = Splat(1.9875691500e-4f);
  y = y * r + Splat(1.3981999507e-3f);
  y = y * r + Splat(8.3334519073e-3f);
  y = y * r + Splat(4.1665795894e-2f);
  y = y * r + Splat(1.6666665459e-1f);
  y = y * r + Splat(5.0000001201e-1f);
  y = y * (r * r) + r + Splat(1.0f);
  const i16v bits = (n + 127) << 23;
  f16v two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// logits[i, s0 : s0 + 16 NV] = q[i, :] . k[:, s0 : s0 + 16 NV] for GB query heads; ls = logits'
// row stride. NV consecutive vectors per key row keep the reads close to a sequential stream.
template <int GB, int NV>
inline void QkBlock(const float* q, const float* k, float* logits, int64_t D, int64_t S, int64_t ls,
                    int64_t s0) {
  f16v acc[GB][NV] = {};
  for (int64_t d = 0; d < D; ++d) {
    f16v kv[NV];
    for (int j = 0; j < NV; ++j) __builtin_prefetch(k + (d + 8) * S + s0 + j * kLanes);
    for (int j = 0; j < NV; ++j) kv[j] = Load(k + d * S + s0 + j * kLanes);
    for (int i = 0; i < GB; ++i) {
      const f16v qi = Splat(q[i * D + d]);
      for (int j = 0; j < NV; ++j) acc[i][j] += qi * kv[j];
    }
  }
  for (int i = 0; i < GB; ++i)
    for (int j = 0; j < NV; ++j) Store(logits + i * ls + s0 + j * kLanes, acc[i][j]);
}

template <int GB>
void Qk(const float* q, const float* k, float* logits, int64_t D, int64_t S, int64_t ls) {
  int64_t s0 = 0;
  for (; s0 + 4 * kLanes <= S; s0 += 4 * kLanes) QkBlock<GB, 4>(q, k, logits, D, S, ls, s0);
  for (; s0 + kLanes <= S; s0 += kLanes) QkBlock<GB, 1>(q, k, logits, D, S, ls, s0);
  for (int i = 0; i < GB; ++i)
    for (int64_t s = s0; s < S; ++s) {
      float x = 0.0f;
      for (int64_t d = 0; d < D; ++d) x += q[i * D + d] * k[d * S + s];
      logits[i * ls + s] = x;
    }
}

// out[i, d0 + 16 j] = sum_s p[i, s] v[s, d0 + 16 j] for GB query heads and DV vectors of head_dim.
template <int GB, int DV>
inline void PvBlock(const float* p, const float* v, float* out, int64_t D, int64_t S, int64_t ls,
                    int64_t d0) {
  f16v acc[GB][DV] = {};
  for (int64_t s = 0; s < S; ++s) {
    f16v vv[DV];
    for (int j = 0; j < DV; ++j) __builtin_prefetch(v + (s + 8) * D + d0 + j * kLanes);
    for (int j = 0; j < DV; ++j) vv[j] = Load(v + s * D + d0 + j * kLanes);
    for (int i = 0; i < GB; ++i) {
      const f16v pi = Splat(p[i * ls + s]);
      for (int j = 0; j < DV; ++j) acc[i][j] += pi * vv[j];
    }
  }
  for (int i = 0; i < GB; ++i)
    for (int j = 0; j < DV; ++j) Store(out + i * D + d0 + j * kLanes, acc[i][j]);
}

template <int GB>
void Pv(const float* p, const float* v, float* out, int64_t D, int64_t S, int64_t ls) {
  int64_t d0 = 0;  // D is a multiple of 16 (checked by the handler)
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) PvBlock<GB, 4>(p, v, out, D, S, ls, d0);
  for (; d0 < D; d0 += kLanes) PvBlock<GB, 1>(p, v, out, D, S, ls, d0);
}

// Query heads go in blocks of up to 3: 3 x 4 accumulators of p.v stay in registers.
void RunUnit(const Step& st, int64_t u, std::vector<float>& scratch) {
  const int64_t K = st.K, G = st.G, D = st.D, S = st.S;
  const int64_t ls = (S + kLanes - 1) / kLanes * kLanes;
  const int64_t b = u / K;
  const int32_t* kp = st.k_pos + b * S;
  const int64_t qp = st.q_pos[b];
  const float* q = st.q + u * G * D;
  const float* k = st.k + u * D * S;
  const float* v = st.v + u * S * D;
  float* out = st.out + u * G * D;

  scratch.assign(G * ls + ls, 0.0f);  // lanes past S stay 0 (finite) and masked off
  float* logits = scratch.data();     // [G, ls]
  float* allowed = logits + G * ls;   // [ls], 1 or 0
  bool any = false;
  for (int64_t s = 0; s < S; ++s) {
    const bool ok = kp[s] >= 0 && kp[s] <= qp && qp - kp[s] < st.window;
    allowed[s] = ok ? 1.0f : 0.0f;
    any |= ok;
  }
  if (!any) {  // a padding row: no key to attend to
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  for (int64_t g = 0; g < G; g += 3) {
    const int64_t n = std::min<int64_t>(3, G - g);
    n == 3   ? Qk<3>(q + g * D, k, logits + g * ls, D, S, ls)
    : n == 2 ? Qk<2>(q + g * D, k, logits + g * ls, D, S, ls)
             : Qk<1>(q + g * D, k, logits + g * ls, D, S, ls);
  }
  const f16v zero = {};
  for (int64_t g = 0; g < G; ++g) {
    float* l = logits + g * ls;
    f16v mv = Splat(-INFINITY);
    for (int64_t s = 0; s < ls; s += kLanes) {
      f16v x = Load(l + s) * Splat(st.scale);
      if (st.softcap > 0)
        for (int i = 0; i < kLanes; ++i) x[i] = std::tanh(x[i] / st.softcap) * st.softcap;
      Store(l + s, x);
      mv = Load(allowed + s) != zero && x > mv ? x : mv;
    }
    float m = mv[0];
    for (int i = 1; i < kLanes; ++i) m = std::max(m, mv[i]);
    f16v sumv = {};
    for (int64_t s = 0; s < ls; s += kLanes) {
      // a select, not a product: a masked slot's logit may be anything, NaN included
      const f16v e = Load(allowed + s) != zero ? Exp(Load(l + s) - Splat(m)) : zero;
      Store(l + s, e);
      sumv += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < kLanes; ++i) sum += sumv[i];
    for (int64_t s = 0; s < ls; s += kLanes) Store(l + s, Load(l + s) / Splat(sum));
  }
  for (int64_t g = 0; g < G; g += 3) {
    const int64_t n = std::min<int64_t>(3, G - g);
    n == 3   ? Pv<3>(logits + g * ls, v, out + g * D, D, S, ls)
    : n == 2 ? Pv<2>(logits + g * ls, v, out + g * D, D, S, ls)
             : Pv<1>(logits + g * ls, v, out + g * D, D, S, ls);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> k_pos,
                           ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> window,
                           ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q, k, v must be rank 4");
  const int64_t B = qd[0], K = qd[1], G = qd[2], D = qd[3], S = kd[3];
  if (D % kLanes)
    return ffi::Error::InvalidArgument("decode_attention: head_dim must be a multiple of 16");
  if (kd[0] != B || kd[1] != K || kd[2] != D || vd[0] != B || vd[1] != K || vd[2] != S || vd[3] != D ||
      k_pos.element_count() != B * S || q_pos.element_count() != B || window.element_count() != 1 ||
      od[0] != B || od[1] != K || od[2] != G || od[3] != D)
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes");
  Step st;
  st.q = q.typed_data();
  st.k = k.typed_data();
  st.v = v.typed_data();
  st.k_pos = k_pos.typed_data();
  st.q_pos = q_pos.typed_data();
  st.out = out->typed_data();
  st.K = K, st.G = G, st.D = D, st.S = S;
  st.scale = scale, st.softcap = softcap, st.window = window.typed_data()[0];
  const int64_t units = B * K;
  // A few units (batch 1: one per kv head) finish before a woken thread would start.
  const bool ok = clipo_kernels::RunUnits(pool, units, units / 4, [&st](int64_t u) {
    thread_local std::vector<float> scratch;
    RunUnit(st, u, scratch);  // may throw std::bad_alloc (the scratch): reported below
  });
  if (!ok) return ffi::Error::Internal("decode_attention: a unit of work failed (out of memory?)");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ClipoDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
