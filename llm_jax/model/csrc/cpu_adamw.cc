// The AdamW update of one parameter on CPU, in one pass, as an XLA FFI custom
// call (llm_jax/training/fused_adamw.py).
//
// XLA:CPU runs Optax's AdamW as several loop fusions per parameter, each of
// which recomputes the new moments from the old ones; because the moments are
// updated in place (the train state is donated), XLA first copies every old
// moment so that the later fusions can still read it. On gpt2_small_cpu that
// was 7% of the float32 step (docs/performance.md). Here one call reads the
// parameter, its gradient and both moments once and writes the three results,
// in place where XLA aliases them (it does: the outputs alias the inputs).
//
// The arithmetic is Optax's, operation for operation, in float32:
//   g  = clip ? (g / norm) * max_norm : g          (clip_by_global_norm)
//   mu = (1 - b1) * g + b1 * mu                     (scale_by_adam)
//   nu = (1 - b2) * (g * g) + b2 * nu
//   u  = (mu / bc1) / (sqrt(nu / bc2 + eps_root) + eps)
//   u  = u + weight_decay * p                       (add_decayed_weights)
//   p  = p + step_size * u                          (scale_by_learning_rate, apply_updates)
// and nothing changes where `finite` is 0 (a non-finite loss or gradient:
// llm_jax/training/steps.py). Moments may be stored in bfloat16
// (optim.state_dtype): read as float32, rounded to nearest even on the way out,
// the update itself using the float32 values, as optim.with_state_dtype does.
//
// scalars (float32[6]): norm, step_size (-lr), bc1 (1 - b1^t), bc2 (1 - b2^t),
// finite (1 or 0), clip (1: scale the gradient, 0: leave it).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "mkl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // Round to nearest even; NaN stays NaN.
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Load(const float* x, int64_t i) { return x[i]; }
inline float Load(const uint16_t* x, int64_t i) { return Bf16ToF32(x[i]); }
inline void Store(float* x, int64_t i, float v) { x[i] = v; }
inline void Store(uint16_t* x, int64_t i, float v) { x[i] = F32ToBf16(v); }

struct Consts {
  float b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, weight_decay, max_norm;
  float norm, step_size, bc1, bc2;
};

template <bool kClip, bool kDecay, typename M>
void Update(int64_t n, const Consts& consts, const float* p, const float* g, const M* mu,
            const M* nu, float* p_out, M* mu_out, M* nu_out) {
  // A copy: read through the reference, every store to the float outputs
  // might change the constants, and GCC kept the loop scalar (4x slower;
  // `omp simd` alone did not change that).
  const Consts c = consts;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    if (kClip) gi = (gi / c.norm) * c.max_norm;
    const float m = c.one_minus_b1 * gi + c.b1 * Load(mu, i);
    const float v = c.one_minus_b2 * (gi * gi) + c.b2 * Load(nu, i);
    float u = (m / c.bc1) / (std::sqrt(v / c.bc2 + c.eps_root) + c.eps);
    const float pi = p[i];
    if (kDecay) u = u + c.weight_decay * pi;
    p_out[i] = pi + c.step_size * u;
    Store(mu_out, i, m);
    Store(nu_out, i, v);
  }
}

template <typename M>
void RunChunk(int64_t n, const Consts& c, bool clip, const float* p, const float* g,
              const M* mu, const M* nu, float* p_out, M* mu_out, M* nu_out) {
  const bool decay = c.weight_decay != 0.0f;
  if (clip && decay) Update<true, true>(n, c, p, g, mu, nu, p_out, mu_out, nu_out);
  if (clip && !decay) Update<true, false>(n, c, p, g, mu, nu, p_out, mu_out, nu_out);
  if (!clip && decay) Update<false, true>(n, c, p, g, mu, nu, p_out, mu_out, nu_out);
  if (!clip && !decay) Update<false, false>(n, c, p, g, mu, nu, p_out, mu_out, nu_out);
}

// Large parameters are split over oneMKL's thread count (as the attention
// kernel's work items are); a chunk is at least kMinChunk elements, so small
// ones run on the calling thread.
constexpr int64_t kMinChunk = 1 << 17;

template <typename M>
void Run(int64_t n, const Consts& c, bool clip, const float* p, const float* g,
         const M* mu, const M* nu, float* p_out, M* mu_out, M* nu_out) {
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(mkl_get_max_threads(), n / kMinChunk));
  const int64_t chunk = (n + threads - 1) / threads;
  auto part = [&](int64_t t) {
    const int64_t lo = t * chunk, len = std::min(n, lo + chunk) - lo;
    if (len > 0) {
      RunChunk(len, c, clip, p + lo, g + lo, mu + lo, nu + lo, p_out + lo, mu_out + lo,
               nu_out + lo);
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(part, t);
  part(0);
  for (auto& th : pool) th.join();
}

void CopyIfApart(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  if (in.untyped_data() != out->untyped_data()) {
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  }
}

ffi::Error AdamW(ffi::AnyBuffer p, ffi::AnyBuffer g, ffi::AnyBuffer mu, ffi::AnyBuffer nu,
                 ffi::Buffer<ffi::F32> scalars, ffi::Result<ffi::AnyBuffer> p_out,
                 ffi::Result<ffi::AnyBuffer> mu_out, ffi::Result<ffi::AnyBuffer> nu_out,
                 float b1, float one_minus_b1, float b2, float one_minus_b2, float eps,
                 float eps_root, float weight_decay, float max_norm) {
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (p.element_type() != ffi::DataType::F32 || g.element_type() != ffi::DataType::F32 ||
      g.element_count() != static_cast<size_t>(n) || mu.element_count() != static_cast<size_t>(n) ||
      nu.element_count() != static_cast<size_t>(n) || mu.element_type() != nu.element_type() ||
      (mu.element_type() != ffi::DataType::F32 && mu.element_type() != ffi::DataType::BF16) ||
      scalars.element_count() != 6) {
    return ffi::Error::InvalidArgument(
        "cpu_adamw: float32 parameter and gradient, float32 or bfloat16 moments of "
        "the same size, and 6 scalars expected");
  }
  const float* s = scalars.typed_data();
  if (s[4] == 0.0f) {  // Not finite: the step changes nothing.
    CopyIfApart(p, p_out);
    CopyIfApart(mu, mu_out);
    CopyIfApart(nu, nu_out);
    return ffi::Error::Success();
  }
  const Consts c{b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, weight_decay, max_norm,
                 s[0], s[1], s[2], s[3]};
  const bool clip = s[5] != 0.0f;
  const float* pp = static_cast<const float*>(p.untyped_data());
  const float* gp = static_cast<const float*>(g.untyped_data());
  float* po = static_cast<float*>(p_out->untyped_data());
  if (mu.element_type() == ffi::DataType::F32) {
    Run(n, c, clip, pp, gp, static_cast<const float*>(mu.untyped_data()),
        static_cast<const float*>(nu.untyped_data()), po,
        static_cast<float*>(mu_out->untyped_data()), static_cast<float*>(nu_out->untyped_data()));
  } else {
    Run(n, c, clip, pp, gp, static_cast<const uint16_t*>(mu.untyped_data()),
        static_cast<const uint16_t*>(nu.untyped_data()), po,
        static_cast<uint16_t*>(mu_out->untyped_data()),
        static_cast<uint16_t*>(nu_out->untyped_data()));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("weight_decay")
                                  .Attr<float>("max_norm"));
