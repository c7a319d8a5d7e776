// Dense matmuls on CPU through oneMKL, as an XLA FFI custom call.
//
// XLA:CPU's own dot does not use AMX; oneMKL's cblas_gemm_bf16bf16f32 does,
// and its sgemm matches PyTorch's. llm_jax/model/cpu_matmul.py compiles this
// file on first use and calls it through jax.ffi.ffi_call.
//
// y[..., M, N] = op(x)[..., M, K] @ op(w)[..., K, N], float32 result, where
// op() transposes the last two axes when transpose_x / transpose_w is set
// (the backward pass passes its operands untransposed and sets these instead
// of copying). x and w are both float32 or both bfloat16 and have the same
// leading (batch) axes; bfloat16 products accumulate in float32.

#include <cstdint>
#include <string>

#include "mkl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Gemm {
  int64_t batch, m, n, k;
  int64_t x_rows, x_cols, w_rows, w_cols;
};

// Reads the problem size from the shapes; an error names what does not fit.
ffi::Error Shape(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions wd,
                 ffi::Span<const int64_t> yd, bool tx, bool tw, Gemm* g) {
  size_t r = xd.size();
  if (r < 2 || wd.size() != r || yd.size() != r) {
    return ffi::Error::InvalidArgument(
        "cpu_matmul: x, w and y need the same rank, at least 2");
  }
  g->batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (xd[i] != wd[i] || xd[i] != yd[i]) {
      return ffi::Error::InvalidArgument("cpu_matmul: batch axes differ");
    }
    g->batch *= xd[i];
  }
  g->x_rows = xd[r - 2];
  g->x_cols = xd[r - 1];
  g->w_rows = wd[r - 2];
  g->w_cols = wd[r - 1];
  g->m = tx ? g->x_cols : g->x_rows;
  g->k = tx ? g->x_rows : g->x_cols;
  g->n = tw ? g->w_rows : g->w_cols;
  int64_t wk = tw ? g->w_cols : g->w_rows;
  if (wk != g->k || yd[r - 2] != g->m || yd[r - 1] != g->n) {
    return ffi::Error::InvalidArgument(
        "cpu_matmul: contracted or result sizes do not match");
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::AnyBuffer x, ffi::AnyBuffer w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y, bool transpose_x,
                  bool transpose_w) {
  Gemm g;
  ffi::Error err = Shape(x.dimensions(), w.dimensions(), y->dimensions(),
                         transpose_x, transpose_w, &g);
  if (err.failure()) return err;
  if (x.element_type() != w.element_type()) {
    return ffi::Error::InvalidArgument("cpu_matmul: x and w dtypes differ");
  }
  const CBLAS_TRANSPOSE ta = transpose_x ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = transpose_w ? CblasTrans : CblasNoTrans;
  const int64_t x_size = g.x_rows * g.x_cols, w_size = g.w_rows * g.w_cols;
  float* out = y->typed_data();
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  for (int64_t b = 0; b < g.batch; ++b) {
    float* yb = out + b * g.m * g.n;
    if (x.element_type() == ffi::DataType::F32) {
      const float* xp = static_cast<const float*>(x.untyped_data()) + b * x_size;
      const float* wp = static_cast<const float*>(w.untyped_data()) + b * w_size;
      cblas_sgemm(CblasRowMajor, ta, tb, g.m, g.n, g.k, 1.0f, xp, g.x_cols, wp,
                  g.w_cols, 0.0f, yb, g.n);
    } else if (x.element_type() == ffi::DataType::BF16) {
      const MKL_BF16* xp =
          static_cast<const MKL_BF16*>(x.untyped_data()) + b * x_size;
      const MKL_BF16* wp =
          static_cast<const MKL_BF16*>(w.untyped_data()) + b * w_size;
      cblas_gemm_bf16bf16f32(CblasRowMajor, ta, tb, g.m, g.n, g.k, 1.0f, xp,
                             g.x_cols, wp, g.w_cols, 0.0f, yb, g.n);
    } else {
      return ffi::Error::InvalidArgument(
          "cpu_matmul: only float32 and bfloat16 operands");
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_x")
                                  .Attr<bool>("transpose_w"));
