// Fused attention on CPU (forward and backward) through oneMKL, as XLA FFI
// custom calls.
//
// XLA:CPU runs attention as batched einsums with layout copies around them
// and a separate softmax; on the 2-core Xeon of docs/performance.md that
// took 1.8x PyTorch's fused SDPA per layer (forward and backward). Here each
// (batch row, head) is one work item: scores for a block of query rows come
// from one gemm straight out of the [B, T, N, H] arrays (row strides, no
// copies), are masked, soft-maxed in float32 and multiplied by the values in a
// second gemm that writes the output in place. With `causal`, key blocks above
// the diagonal are never computed. The backward pass recomputes the
// probabilities from the saved log-sum-exp (nothing [T, S]-sized is stored
// between the passes) and accumulates the key/value gradients of the query
// heads that share a key/value head (grouped-query attention) in one work
// item, so no two threads write the same rows.
//
// Arrays (letters as in llm_jax/model/transformer.py):
//   q [B, T, N, H], k and v [B, S, K, H] (K divides N), all float32 or all
//   bfloat16; mask [Bm, T, S] bool with Bm 1 or B (true: query t sees key s);
//   o [B, T, N, H] as q; lse [B, N, T] float32 (of the scaled, masked scores).
// Scores are (q . k) * scale in float32; masked scores are float32's lowest
// value, as llm_jax.model.attention.xla_attend does. bfloat16 products
// accumulate in float32 (cblas_gemm_bf16bf16f32, AMX where the CPU has it);
// probabilities are rounded to bfloat16 before they multiply bfloat16 values.
// `causal` promises that the mask allows no key after its query (s <= t when
// T == S); keys past the diagonal block are then skipped.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "mkl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 64;  // Query rows per block.
constexpr float kLowest = std::numeric_limits<float>::lowest();

// ---- bfloat16 <-> float32 and the two gemms, by operand type.

inline float ToFloat(float x) { return x; }
inline float ToFloat(MKL_BF16 x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void FromFloat(const float* x, int64_t n, MKL_BF16* y) {
  // Round to nearest even, as XLA's convert does (NaN stays NaN).
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], 4);
    uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
    bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    y[i] = static_cast<MKL_BF16>(nan ? ((bits >> 16) | 0x40u) : (rounded >> 16));
  }
}

inline void FromFloat(const float* x, int64_t n, float* y) {
  std::memcpy(y, x, n * sizeof(float));
}

// C[m, n] (float32, leading dimension ldc) = beta * C + op(A) . op(B).
inline void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                 const float* a, int64_t lda, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
              tb ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a, lda, b, ldb,
              beta, c, ldc);
}

inline void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                 const MKL_BF16* a, int64_t lda, const MKL_BF16* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_gemm_bf16bf16f32(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
                         tb ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a, lda,
                         b, ldb, beta, c, ldc);
}

// ---- Row-wise pieces of the softmax (vectorised per CPU at load time).

// exp(x) for x <= 0, as float32, to about 1 ulp (Cephes' expf polynomial),
// branch-free so that loops over it vectorise; 0 below -87.3, where float32's
// normal numbers end (XLA:CPU flushes denormals to zero too).
inline float ExpNonPositive(float x) {
  const float lo = -87.33654f;
  const bool under = x < lo;
  x = under ? lo : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorises, unlike roundf).
  const float shift = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shift) - shift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return under ? 0.0f : p * two_n;
}

// A bool mask read as bytes (0 or 1), which the vectoriser can load.
inline const uint8_t* Bytes(const bool* mask) {
  static_assert(sizeof(bool) == 1, "bool masks are one byte");
  return reinterpret_cast<const uint8_t*>(mask);
}

// x = mask ? x * scale : lowest; returns the row's maximum.
__attribute__((target_clones("avx512f", "avx2", "default")))
float ScaleMaskMax(float* __restrict x, const uint8_t* __restrict mask, int64_t n,
                   float scale) {
  float mx = kLowest;
#pragma omp simd reduction(max : mx)
  for (int64_t s = 0; s < n; ++s) {
    float v = mask[s] ? x[s] * scale : kLowest;
    x[s] = v;
    mx = mx > v ? mx : v;
  }
  return mx;
}

// x = exp(x - mx) / sum; returns the sum.
__attribute__((target_clones("avx512f", "avx2", "default")))
float ExpNormalise(float* x, int64_t n, float mx) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < n; ++s) {
    float e = ExpNonPositive(x[s] - mx);
    x[s] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) x[s] *= inv;
  return sum;
}

// p = mask ? exp(x * scale - lse) : 0, in two passes (the mask's select and
// the exponential do not vectorise in one loop).
__attribute__((target_clones("avx512f", "avx2", "default")))
void Probabilities(float* __restrict x, const uint8_t* __restrict mask, int64_t n, float scale,
                   float lse) {
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) {
    x[s] = mask[s] ? x[s] * scale - lse : -100.0f;  // exp(-100) is 0 here.
  }
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) x[s] = ExpNonPositive(x[s]);
}

// ds = p * (dp - d) * scale.
__attribute__((target_clones("avx512f", "avx2", "default")))
void SoftmaxGrad(const float* p, float* dp, int64_t n, float d, float scale) {
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) dp[s] = p[s] * (dp[s] - d) * scale;
}

// ---- Shapes.

struct Dims {
  int64_t B, T, S, N, K, H, mask_batch;
};

ffi::Error ReadDims(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::PRED> mask, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3) {
    return ffi::Error::InvalidArgument(
        "cpu_attention: q, k, v need rank 4 and the mask rank 3");
  }
  *d = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], md[0]};
  bool ok = kd[0] == d->B && kd[3] == d->H && vd[0] == d->B &&
            vd[1] == d->S && vd[2] == d->K && vd[3] == d->H && d->K > 0 &&
            d->N % d->K == 0 && (d->mask_batch == 1 || d->mask_batch == d->B) &&
            md[1] == d->T && md[2] == d->S;
  if (!ok) {
    return ffi::Error::InvalidArgument("cpu_attention: shapes do not match");
  }
  if (q.element_type() != k.element_type() ||
      q.element_type() != v.element_type() ||
      (q.element_type() != ffi::DataType::F32 &&
       q.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument(
        "cpu_attention: q, k, v must all be float32 or all bfloat16");
  }
  return ffi::Error::Success();
}

// Keys a block of query rows [t0, t1) needs: with `causal` (and T == S) the
// keys up to the block's last row, else all of them.
inline int64_t KeysFor(const Dims& d, bool causal, int64_t t1) {
  return (causal && d.T == d.S) ? t1 : d.S;
}

// Runs fn(item) for item in [0, n) on oneMKL's thread count (single-threaded
// oneMKL inside each worker).
template <typename Fn>
void ParallelFor(int64_t n, Fn fn) {
  int threads = static_cast<int>(std::min<int64_t>(n, mkl_get_max_threads()));
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    int before = mkl_set_num_threads_local(1);
    for (int64_t i = next++; i < n; i = next++) fn(i);
    mkl_set_num_threads_local(before);
  };
  if (threads <= 1) {
    work();
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// ---- Forward.

template <typename T>
void Forward(const Dims& d, const T* q, const T* k, const T* v,
             const bool* mask, bool causal, float scale, T* o, float* lse) {
  const int64_t G = d.N / d.K, ldq = d.N * d.H, ldk = d.K * d.H;
  ParallelFor(d.B * d.N, [&](int64_t item) {
    const int64_t b = item / d.N, n = item % d.N, kh = n / G;
    const T* qb = q + b * d.T * ldq + n * d.H;
    const T* kb = k + b * d.S * ldk + kh * d.H;
    const T* vb = v + b * d.S * ldk + kh * d.H;
    T* ob = o + b * d.T * ldq + n * d.H;
    const bool* mb = mask + (d.mask_batch == 1 ? 0 : b) * d.T * d.S;
    float* lb = lse + (b * d.N + n) * d.T;
    std::vector<float> scores(kRows * d.S), out(kRows * d.H);
    std::vector<T> probs(std::is_same<T, float>::value ? 0 : kRows * d.S);
    for (int64_t t0 = 0; t0 < d.T; t0 += kRows) {
      const int64_t rows = std::min(kRows, d.T - t0);
      const int64_t keys = KeysFor(d, causal, t0 + rows);
      float* sc = scores.data();
      Gemm(false, true, rows, keys, d.H, qb + t0 * ldq, ldq, kb, ldk, 0.0f, sc,
           keys);
      for (int64_t i = 0; i < rows; ++i) {
        float* row = sc + i * keys;
        float mx = ScaleMaskMax(row, Bytes(mb + (t0 + i) * d.S), keys, scale);
        float sum = ExpNormalise(row, keys, mx);
        lb[t0 + i] = mx + std::log(sum);
      }
      if constexpr (std::is_same<T, float>::value) {
        Gemm(false, false, rows, d.H, keys, sc, keys, vb, ldk, 0.0f,
             ob + t0 * ldq, ldq);
      } else {
        FromFloat(sc, rows * keys, probs.data());
        Gemm(false, false, rows, d.H, keys, probs.data(), keys, vb, ldk, 0.0f,
             out.data(), d.H);
        for (int64_t i = 0; i < rows; ++i) {
          FromFloat(out.data() + i * d.H, d.H, ob + (t0 + i) * ldq);
        }
      }
    }
  });
}

ffi::Error AttentionForward(ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::Buffer<ffi::PRED> mask,
                            ffi::Result<ffi::AnyBuffer> o,
                            ffi::Result<ffi::Buffer<ffi::F32>> lse,
                            bool causal, float scale) {
  Dims d;
  ffi::Error err = ReadDims(q, k, v, mask, &d);
  if (err.failure()) return err;
  if (o->element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("cpu_attention: o must have q's dtype");
  }
  const bool* m = mask.typed_data();
  auto run = [&](auto type_tag) {
    using F = decltype(type_tag);
    Forward(d, static_cast<const F*>(q.untyped_data()),
            static_cast<const F*>(k.untyped_data()),
            static_cast<const F*>(v.untyped_data()), m, causal, scale,
            static_cast<F*>(o->untyped_data()), lse->typed_data());
  };
  if (q.element_type() == ffi::DataType::F32) {
    run(0.0f);
  } else {
    run(static_cast<MKL_BF16>(0));
  }
  return ffi::Error::Success();
}

// ---- Backward.

template <typename T>
void Backward(const Dims& d, const T* q, const T* k, const T* v,
              const bool* mask, const T* o, const float* lse, const T* dout,
              bool causal, float scale, T* dq, T* dk, T* dv) {
  const int64_t G = d.N / d.K, ldq = d.N * d.H, ldk = d.K * d.H;
  constexpr bool kF32 = std::is_same<T, float>::value;
  ParallelFor(d.B * d.K, [&](int64_t item) {
    const int64_t b = item / d.K, kh = item % d.K;
    const T* kb = k + b * d.S * ldk + kh * d.H;
    const T* vb = v + b * d.S * ldk + kh * d.H;
    const bool* mb = mask + (d.mask_batch == 1 ? 0 : b) * d.T * d.S;
    std::vector<float> dk_acc(d.S * d.H, 0.0f), dv_acc(d.S * d.H, 0.0f);
    std::vector<float> p(kRows * d.S), dp(kRows * d.S), dq_rows(kRows * d.H);
    std::vector<T> p_t(kF32 ? 0 : kRows * d.S), ds_t(kF32 ? 0 : kRows * d.S);
    std::vector<float> delta(kRows);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      const T* qb = q + b * d.T * ldq + n * d.H;
      const T* ob = o + b * d.T * ldq + n * d.H;
      const T* gb = dout + b * d.T * ldq + n * d.H;
      T* dqb = dq + b * d.T * ldq + n * d.H;
      const float* lb = lse + (b * d.N + n) * d.T;
      for (int64_t t0 = 0; t0 < d.T; t0 += kRows) {
        const int64_t rows = std::min(kRows, d.T - t0);
        const int64_t keys = KeysFor(d, causal, t0 + rows);
        // p = softmax, recomputed from the saved log-sum-exp.
        Gemm(false, true, rows, keys, d.H, qb + t0 * ldq, ldq, kb, ldk, 0.0f,
             p.data(), keys);
        for (int64_t i = 0; i < rows; ++i) {
          float* row = p.data() + i * keys;
          Probabilities(row, Bytes(mb + (t0 + i) * d.S), keys, scale, lb[t0 + i]);
          float dsum = 0.0f;
          const T* gr = gb + (t0 + i) * ldq;
          const T* orow = ob + (t0 + i) * ldq;
          for (int64_t h = 0; h < d.H; ++h) dsum += ToFloat(gr[h]) * ToFloat(orow[h]);
          delta[i] = dsum;
        }
        // dp = dout . v^T; dv += p^T . dout.
        Gemm(false, true, rows, keys, d.H, gb + t0 * ldq, ldq, vb, ldk, 0.0f,
             dp.data(), keys);
        const T* p_op;
        if constexpr (kF32) {
          p_op = p.data();
        } else {
          FromFloat(p.data(), rows * keys, p_t.data());
          p_op = p_t.data();
        }
        Gemm(true, false, keys, d.H, rows, p_op, keys, gb + t0 * ldq, ldq, 1.0f,
             dv_acc.data(), d.H);
        // ds = p * (dp - delta) * scale; dq = ds . k; dk += ds^T . q.
        for (int64_t i = 0; i < rows; ++i) {
          SoftmaxGrad(p.data() + i * keys, dp.data() + i * keys, keys, delta[i],
                      scale);
        }
        const T* ds_op;
        if constexpr (kF32) {
          ds_op = dp.data();
          Gemm(false, false, rows, d.H, keys, ds_op, keys, kb, ldk, 0.0f,
               dqb + t0 * ldq, ldq);
        } else {
          FromFloat(dp.data(), rows * keys, ds_t.data());
          ds_op = ds_t.data();
          Gemm(false, false, rows, d.H, keys, ds_op, keys, kb, ldk, 0.0f,
               dq_rows.data(), d.H);
          for (int64_t i = 0; i < rows; ++i) {
            FromFloat(dq_rows.data() + i * d.H, d.H, dqb + (t0 + i) * ldq);
          }
        }
        Gemm(true, false, keys, d.H, rows, ds_op, keys, qb + t0 * ldq, ldq, 1.0f,
             dk_acc.data(), d.H);
      }
    }
    T* dkb = dk + b * d.S * ldk + kh * d.H;
    T* dvb = dv + b * d.S * ldk + kh * d.H;
    for (int64_t s = 0; s < d.S; ++s) {
      FromFloat(dk_acc.data() + s * d.H, d.H, dkb + s * ldk);
      FromFloat(dv_acc.data() + s * d.H, d.H, dvb + s * ldk);
    }
  });
}

ffi::Error AttentionBackward(
    ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
    ffi::Buffer<ffi::PRED> mask, ffi::AnyBuffer o, ffi::Buffer<ffi::F32> lse,
    ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
    bool causal, float scale) {
  Dims d;
  ffi::Error err = ReadDims(q, k, v, mask, &d);
  if (err.failure()) return err;
  auto t = q.element_type();
  if (o.element_type() != t || dout.element_type() != t ||
      dq->element_type() != t || dk->element_type() != t ||
      dv->element_type() != t) {
    return ffi::Error::InvalidArgument(
        "cpu_attention: o, dout and the gradients must have q's dtype");
  }
  const bool* m = mask.typed_data();
  // One instantiation per operand type (the argument only carries the type).
  auto run = [&](auto type_tag) {
    using F = decltype(type_tag);
    Backward(d, static_cast<const F*>(q.untyped_data()),
             static_cast<const F*>(k.untyped_data()),
             static_cast<const F*>(v.untyped_data()), m,
             static_cast<const F*>(o.untyped_data()), lse.typed_data(),
             static_cast<const F*>(dout.untyped_data()), causal, scale,
             static_cast<F*>(dq->untyped_data()),
             static_cast<F*>(dk->untyped_data()),
             static_cast<F*>(dv->untyped_data()));
  };
  if (t == ffi::DataType::F32) {
    run(0.0f);
  } else {
    run(static_cast<MKL_BF16>(0));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuAttentionFwd, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuAttentionBwd, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));
