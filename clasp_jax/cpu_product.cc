// A narrow matrix product for a CPU: out[R, N] = x[R, K] @ w[K, N] in float32, for the few
// rows of a decoding pass, reading the weight once, at memory speed, whatever R is.
//
// XLA's CPU products read a weight at memory speed for one row, but from two rows on they run
// a general matrix product that packs the weight first, at a third to a half of that speed
// (docs/results/cpu/pass_width/product_rows.txt). Here a block of columns keeps its rows'
// sums in registers while it streams down the weight's K rows, prefetching ahead; the blocks
// are shared out among XLA's CPU threads.
//
// Every output element is summed in the same order, k = 0, 1, ..., K - 1, one multiply-add at
// a time (fused where the machine has FMA: -ffp-contract=fast), whatever R and its thread: a
// row's result does not depend on the other rows of its pass.
//
// Built by `clasp_jax.cpu_product` with this machine's compiler for this machine's vectors
// (-march=native) and registered with XLA as an FFI target.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

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

constexpr int kBlockVectors = 8;                    // a block's width, in vectors (<= 8)
constexpr int64_t kBlock = kBlockVectors * kLanes;  // a block's width, in columns
constexpr int kMaxRows = 3;        // rows summed in one sweep of the weight
constexpr int kPrefetchRows = 16;  // how far ahead down the weight to prefetch

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// out[r, n0 : n0 + V * kLanes] for the R rows of x.
template <int R, int V>
void Columns(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n0) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = Vec{};
  const float* w_k = w + n0;
  for (int64_t k = 0; k < K; ++k, w_k += N) {
    for (int j = 0; j < V * kLanes; j += 64 / sizeof(float))  // a cache line at a time
      __builtin_prefetch(w_k + kPrefetchRows * N + j, 0, 3);
    Vec w_V[V];
    for (int j = 0; j < V; ++j) w_V[j] = Load(w_k + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float x_rk = x[r * K + k];
      for (int j = 0; j < V; ++j) acc[r][j] += x_rk * w_V[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) Store(out + r * N + n0 + j * kLanes, acc[r][j]);
}

// out[r, n0 : n1] for the R rows of x, fewer columns than a vector's lanes. An explicit fused
// multiply-add: left to contract `acc + x * w`, the compiler did so for some R and not others.
template <int R>
void Tail(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    float acc[R] = {};
    for (int64_t k = 0; k < K; ++k)
      for (int r = 0; r < R; ++r) acc[r] = std::fma(x[r * K + k], w[k * N + n], acc[r]);
    for (int r = 0; r < R; ++r) out[r * N + n] = acc[r];
  }
}

// Columns [block * kBlock, ...) of one block: a whole block, or the last one (narrower: as
// many whole vectors as fit, then single columns).
template <int R>
void Block(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t block) {
  const int64_t n0 = block * kBlock;
  const int64_t n1 = std::min(N, n0 + kBlock), vectors = (n1 - n0) / kLanes;
  switch (vectors) {
    case 8: Columns<R, 8>(x, w, out, K, N, n0); break;
    case 7: Columns<R, 7>(x, w, out, K, N, n0); break;
    case 6: Columns<R, 6>(x, w, out, K, N, n0); break;
    case 5: Columns<R, 5>(x, w, out, K, N, n0); break;
    case 4: Columns<R, 4>(x, w, out, K, N, n0); break;
    case 3: Columns<R, 3>(x, w, out, K, N, n0); break;
    case 2: Columns<R, 2>(x, w, out, K, N, n0); break;
    case 1: Columns<R, 1>(x, w, out, K, N, n0); break;
    default: break;
  }
  Tail<R>(x, w, out, K, N, n0 + vectors * kLanes, n1);
}

void RowsBlock(const float* x, const float* w, float* out, int64_t R, int64_t K, int64_t N,
               int64_t block) {
  for (int64_t r0 = 0; r0 < R; r0 += kMaxRows) {
    const float* x_r = x + r0 * K;
    float* out_r = out + r0 * N;
    switch (std::min<int64_t>(R - r0, kMaxRows)) {
      case 1: Block<1>(x_r, w, out_r, K, N, block); break;
      case 2: Block<2>(x_r, w, out_r, K, N, block); break;
      default: Block<3>(x_r, w, out_r, K, N, block); break;
    }
  }
}

// The blocks still to compute, claimed one at a time by the calling thread and the pool's
// helpers; shared with helpers that may start after the call has returned.
struct Work {
  const float* x;
  const float* w;
  float* out;
  int64_t R, K, N, blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    int64_t finished = 0;
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks; ++finished)
      RowsBlock(x, w, out, R, K, N, b);
    done.fetch_add(finished, std::memory_order_release);
  }
};

ffi::Error RowsProductImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto x_dims = x.dimensions(), w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[0])
    return ffi::Error::InvalidArgument("rows_product takes x [R, K] and w [K, N]");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->out = out->typed_data();
  work->R = x_dims[0];
  work->K = x_dims[1];
  work->N = w_dims[1];
  work->blocks = (work->N + kBlock - 1) / kBlock;
  // A helper a block, up to the pool's size; the caller works too, so none is waited for
  // before it starts (a helper that starts late finds nothing left).
  int64_t helpers = std::min<int64_t>(pool.num_threads(), work->blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsProduct, RowsProductImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
