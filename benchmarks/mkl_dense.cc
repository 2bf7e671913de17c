// benchmarks/mkl_dense.py's XLA FFI handler: C[m, n] = op(A) op(B) through MKL's cblas_sgemm,
// where op transposes its operand when the attribute says so (A stored [k, m], B stored [n, k]).
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k,
                            float alpha, const float* a, int lda, const float* b, int ldb,
                            float beta, float* c, int ldc);

static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2) {
    return ffi::Error::InvalidArgument("mkl_gemm takes 2-D operands");
  }
  const int64_t m = trans_a ? a_dims[1] : a_dims[0];
  const int64_t k = trans_a ? a_dims[0] : a_dims[1];
  const int64_t n = trans_b ? b_dims[0] : b_dims[1];
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
              a.typed_data(), a_dims[1], b.typed_data(), b_dims[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MklGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
