// A narrow matrix product for a CPU: out[R, N] = x[R, K] @ w[K, N] in float32, for the few
// rows of a decoding pass, reading the weight once, at memory speed, whatever R is.
//
// XLA's CPU products read a weight at memory speed for one row, but from two rows on they run
// a general matrix product that packs the weight first, at a third to a half of that speed
// (docs/results/cpu/pass_width/product_rows.txt). Here each thread takes a range of columns
// and walks down the weight a tile of kTileRows rows at a time, along the rows (sequential
// reads, prefetched ahead); the rows' sums of a vector of columns stay in registers across a
// tile and wait in `out` between tiles. Ranges are shared out among XLA's CPU threads
// (cpu_tasks.h).
//
// Every output element is summed in the same order, k = 0, 1, ..., K - 1, one multiply-add at
// a time (fused where the machine has FMA: -ffp-contract=fast), whatever R and its thread: a
// row's result does not depend on the other rows of its pass.
//
// Built by `clasp_jax.cpu_product` with this machine's compiler for this machine's vectors
// (-march=native) and registered with XLA as an FFI target.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int kMaxRows = 3;          // rows summed in one sweep of the weight
constexpr int64_t kTileRows = 16;    // weight rows a vector's sums stay in registers for
constexpr int64_t kPrefetchRows = 8;  // how far ahead down the weight to prefetch
constexpr int kRangesPerThread = 2;  // column ranges a product is cut into, per thread

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// out[r, c0 : c1] for the R rows of x.
template <int R>
void Range(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t c0,
           int64_t c1) {
  const int64_t whole = c0 + (c1 - c0) / kLanes * kLanes;  // columns in whole vectors
  for (int r = 0; r < R; ++r) std::memset(out + r * N + c0, 0, (c1 - c0) * sizeof(float));
  for (int64_t k0 = 0; k0 < K; k0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, K - k0);
    const float* w_k = w + k0 * N;
    for (int64_t c = c0; c < whole; c += kLanes) {
      Vec acc[R];
      for (int r = 0; r < R; ++r) acc[r] = Load(out + r * N + c);
      const bool line_start = (c - c0) % (64 / sizeof(float)) == 0;
      for (int64_t kk = 0; kk < rows; ++kk) {
        if (line_start) __builtin_prefetch(w_k + (kPrefetchRows + kk) * N + c, 0, 3);
        const Vec w_v = Load(w_k + kk * N + c);
        for (int r = 0; r < R; ++r) acc[r] += x[r * K + k0 + kk] * w_v;
      }
      for (int r = 0; r < R; ++r) Store(out + r * N + c, acc[r]);
    }
    // The last columns, fewer than a vector's lanes. An explicit fused multiply-add: left to
    // contract `acc + x * w`, the compiler did so for some R and not others.
    for (int64_t c = whole; c < c1; ++c)
      for (int64_t kk = 0; kk < rows; ++kk)
        for (int r = 0; r < R; ++r)
          out[r * N + c] = std::fma(x[r * K + k0 + kk], w_k[kk * N + c], out[r * N + c]);
  }
}

void RowsRange(const float* x, const float* w, float* out, int64_t R, int64_t K, int64_t N,
               int64_t c0, int64_t c1) {
  for (int64_t r0 = 0; r0 < R; r0 += kMaxRows) {
    const float* x_r = x + r0 * K;
    float* out_r = out + r0 * N;
    switch (std::min<int64_t>(R - r0, kMaxRows)) {
      case 1: Range<1>(x_r, w, out_r, K, N, c0, c1); break;
      case 2: Range<2>(x_r, w, out_r, K, N, c0, c1); break;
      default: Range<3>(x_r, w, out_r, K, N, c0, c1); break;
    }
  }
}

ffi::Error RowsProductImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto x_dims = x.dimensions(), w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[0])
    return ffi::Error::InvalidArgument("rows_product takes x [R, K] and w [K, N]");
  const float* x_RK = x.typed_data();
  const float* w_KN = w.typed_data();
  float* out_RN = out->typed_data();
  const int64_t R = x_dims[0], K = x_dims[1], N = w_dims[1];
  const int64_t vectors = (N + kLanes - 1) / kLanes;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t ranges = std::min(threads * kRangesPerThread, vectors);
  // Range i holds the vectors [i V / n, (i + 1) V / n) of V, so its ends do not depend on R.
  clasp_jax::RunTasks(pool, ranges, [=](int64_t i) {
    RowsRange(x_RK, w_KN, out_RN, R, K, N, std::min(N, vectors * i / ranges * kLanes),
              std::min(N, vectors * (i + 1) / ranges * kLanes));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsProduct, RowsProductImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
