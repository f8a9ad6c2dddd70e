// Decode attention over the KV cache for a CPU, each query row computed on its own: out[t, h]
// for the T rows of a pass (batch 1), in float32, every row in one fixed order that depends
// on nothing but its own position, so that a row of a 3-row pass computes what a 1-row pass
// of its token computes, bit for bit (`Decoder`'s `rows_apart`).
//
// Row t at position start + t sees key p iff p <= last[t] or p == own[t] (the riders of the
// CLaSp DP see the cache below their position and their own key: `attention.row_limits`). A
// key at p in [start, start + T) is the chunk's row p - start, else the cache's. Keys go in
// blocks of kBlock positions from position 0, up to the block holding the row's last visible
// key, with an online softmax from block to block: in each block the scores of its visible
// keys, their maximum, their weights and the weights' sum (each in kLanes partial results
// folded in a fixed tree), the running sum and output scaled once and the output then added
// to key by key in position order. A block without a visible key is skipped. No arithmetic
// depends on T, on the other rows or on which thread runs a row.
//
// A task is one KV head of one row: its G query heads' scores for a block, kLanes keys at a
// time (each key's kLanes partial sums along the head dimension folded in a fixed tree, the
// keys' folds side by side in vectors; up to four heads share each load of a key), then their
// weights and outputs. Tasks are shared out among XLA's CPU threads (cpu_tasks.h). The head
// dimension is whole vectors of kLanes.
//
// Built by `clasp_jax.cpu_product` beside the product kernel and registered with XLA as an
// FFI target; `clasp_jax.cpu_attention` is its Python side, and `attention.row_attention` the
// plain `jnp` version it is tested against.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 128;  // keys a block (attention.ATTENTION_BLOCK)

// exp(x) for x <= 0 (a score less the running maximum): a Cephes-style polynomial, exactly 1
// at 0, written for the compiler to vectorise over a block.
inline float Exp(float x) {
  const float v = std::max(x, -87.0f);
  const float n = std::floor(v * 1.44269504088896341f + 0.5f);
  float r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int kLanes = 16;  // partial sums and maxima (an AVX-512 vector's lanes)
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Mask __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Of a and b, each made of runs of 2 * width lanes, the lanes [offset, offset + width) of
// each run, a's runs then b's: a fold's halves of kLanes / (2 width) keys a vector.
inline Vec Pick(Vec a, Vec b, int width, int offset) {
  Mask mask;
  const int runs = kLanes / (2 * width);
  for (int i = 0; i < kLanes; ++i) {
    const int run = i / width, lane = i % width;
    mask[i] = run < runs ? run * 2 * width + offset + lane
                         : kLanes + (run - runs) * 2 * width + offset + lane;
  }
  return __builtin_shuffle(a, b, mask);
}

// lanes[0] after folding the upper half of the lanes onto the lower, halving until one is left:
// a fixed tree, which the compiler keeps in vector registers.
template <class Op>
inline float Fold(float* lanes, Op op) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] = op(lanes[i], lanes[i + width]);
  return lanes[0];
}

// v[0] after folding count vectors pairwise, level by level, the first level's pairs picked
// `width` lanes at a time and each next level's half as many (`Pick`): for kLanes vectors
// from width kLanes / 2, each vector's fold side by side in one.
template <int kCount, int kWidth>
inline Vec FoldPairs(Vec* v) {
  if constexpr (kCount == 1) {
    return v[0];
  } else {
    for (int j = 0; j < kCount / 2; ++j)
      v[j] = Pick(v[2 * j], v[2 * j + 1], kWidth, 0) + Pick(v[2 * j], v[2 * j + 1], kWidth, kWidth);
    return FoldPairs<kCount / 2, kWidth / 2>(v);
  }
}

// Query heads whose scores share the loads of their keys (`Work::ScoresOfHeads`), and the keys
// of a pass for kG of them: as many as keep kG x kKeys partial sums within 24 vector registers.
constexpr int kMaxHeads = 4;
constexpr int KeysAtATime(int kG) { return kG == 1 ? kLanes : kG <= 3 ? kLanes / 2 : kLanes / 4; }

inline float Add(float a, float b) { return a + b; }
inline float Max(float a, float b) { return std::max(a, b); }

struct Work {
  const float* q;        // [T, H, hd]
  const float* k_chunk;  // [T, KV, hd]
  const float* v_chunk;
  const float* cache_k;  // [S, KV, hd], the layer's
  const float* cache_v;
  const int32_t* last;   // [T]
  const int32_t* own;    // [T]
  const float* zeros;    // [hd]: the key of a position past the row's last (its score unused)
  float* out;            // [T, H, hd]
  int64_t T, H, KV, hd, S, start;
  float scale;

  // The key (or value) row at position p for KV head kv, or nullptr past what is there.
  const float* At(const float* chunk, const float* cache, int64_t p, int64_t kv) const {
    if (p >= start && p < start + T) return chunk + ((p - start) * KV + kv) * hd;
    if (p < S) return cache + (p * KV + kv) * hd;
    return nullptr;
  }

  // The scores of kG query heads q_G [kG, hd] against kLanes keys, into s_G[g * kBlock + j]:
  // each key's products with a head summed along the head dimension in kLanes partial sums, in
  // order, which are then folded in a fixed tree (Fold's), the keys' folds side by side in
  // vectors. The heads share each load of a key, and kKeys keys go at a time, their sums
  // advancing together so that their multiply-adds do not wait on one another; each pass folds
  // its keys as far as they go alone and the passes are folded together after, the same tree
  // as for all kLanes keys at once.
  template <int kG>
  void ScoresOfHeads(const float* q_G, const float* const* keys, float* s_G) const {
    constexpr int kKeys = KeysAtATime(kG), kPasses = kLanes / kKeys;
    Vec folded[kG][kPasses];
    for (int pass = 0; pass < kPasses; ++pass) {
      Vec partial[kG][kKeys] = {};
      for (int64_t d0 = 0; d0 < hd; d0 += kLanes) {
        Vec q_d[kG];
#pragma GCC unroll 4
        for (int g = 0; g < kG; ++g) q_d[g] = Load(q_G + g * hd + d0);
#pragma GCC unroll 16
        for (int j = 0; j < kKeys; ++j) {
          const Vec k_d = Load(keys[pass * kKeys + j] + d0);
#pragma GCC unroll 4
          for (int g = 0; g < kG; ++g) partial[g][j] += q_d[g] * k_d;
        }
      }
      for (int g = 0; g < kG; ++g) folded[g][pass] = FoldPairs<kKeys, kLanes / 2>(partial[g]);
    }
    for (int g = 0; g < kG; ++g) {
      const Vec scores = FoldPairs<kPasses, kLanes / 2 / kKeys>(folded[g]);
      std::memcpy(s_G + g * kBlock, &scores, sizeof(scores));
    }
  }

  // The scores of query heads [g0, g0 + count) against kLanes keys (`ScoresOfHeads`), at most
  // kMaxHeads heads at a time.
  void Scores(const float* q_t, const float* const* keys, int64_t g0, int64_t count,
              float* s) const {
    const float* q_G = q_t + g0 * hd;
    float* s_G = s + g0 * kBlock;
    switch (count) {
      case 1: return ScoresOfHeads<1>(q_G, keys, s_G);
      case 2: return ScoresOfHeads<2>(q_G, keys, s_G);
      case 3: return ScoresOfHeads<3>(q_G, keys, s_G);
      default: return ScoresOfHeads<kMaxHeads>(q_G, keys, s_G);
    }
  }

  // o_Y[d0, d0 + kSpan kLanes) += w[j] v[j, d0, ...) for the visible keys j in [first, end), in
  // key order, the span kept in registers across the keys.
  template <int kSpan>
  static void AddSpan(const float* w, const float* const* values, const int32_t* visible,
                      int64_t first, int64_t end, int64_t d0, float* o_Y) {
    Vec acc[kSpan];
    for (int c = 0; c < kSpan; ++c) acc[c] = Load(o_Y + d0 + c * kLanes);
    for (int64_t j = first; j < end; ++j) {
      if (!visible[j]) continue;
      for (int c = 0; c < kSpan; ++c) acc[c] += w[j] * Load(values[j] + d0 + c * kLanes);
    }
    std::memcpy(o_Y + d0, acc, sizeof(acc));
  }

  // o_Y += w[j] v[j] for the visible keys j in [first, end): each element of o_Y gets its
  // terms in key order, 4 vectors of it at a time (then one at a time for the rest).
  void AddValues(const float* w, const float* const* values, const int32_t* visible,
                 int64_t first, int64_t end, float* o_Y) const {
    constexpr int kSpan = 4;
    int64_t d0 = 0;
    for (; d0 + kSpan * kLanes <= hd; d0 += kSpan * kLanes)
      AddSpan<kSpan>(w, values, visible, first, end, d0, o_Y);
    for (; d0 < hd; d0 += kLanes) AddSpan<1>(w, values, visible, first, end, d0, o_Y);
  }

  void Task(int64_t t, int64_t kv) const {
    const int64_t G = H / KV;
    const int64_t last_t = last[t], own_t = own[t];
    const int64_t top = std::max(last_t, own_t);  // the last visible key
    std::vector<float> m(G, -std::numeric_limits<float>::infinity()), l(G, 0.0f);
    std::vector<float> o(G * hd, 0.0f), s(G * kBlock), p(G * kBlock);
    const float* q_t = q + (t * H + kv * G) * hd;  // [G, hd]
    int32_t visible[kBlock];  // 0 or 1: int32 lanes, so that the loops over a block vectorise
    const float* values[kBlock];
    for (int64_t b0 = 0; b0 <= top; b0 += kBlock) {
      int64_t first = -1, end = 0;  // the block's visible keys lie in [first, end)
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t pos = b0 + j;
        visible[j] = pos <= last_t || pos == own_t;
        values[j] = visible[j] ? At(v_chunk, cache_v, pos, kv) : nullptr;
        if (visible[j]) {
          if (first < 0) first = j;
          end = j + 1;
        }
      }
      if (first < 0) continue;
      // Scores s[g, j] = the sum over d of q[g, d] k[j, d], kLanes keys at a time.
      for (int64_t j0 = 0; j0 < kBlock; j0 += kLanes) {
        const float* keys[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          const float* key = b0 + j0 + j <= top ? At(k_chunk, cache_k, b0 + j0 + j, kv) : nullptr;
          keys[j] = key != nullptr ? key : zeros;
        }
        for (int64_t g0 = 0; g0 < G; g0 += kMaxHeads)
          Scores(q_t, keys, g0, std::min<int64_t>(kMaxHeads, G - g0), s.data() + j0);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s_g = s.data() + g * kBlock;
        float* p_g = p.data() + g * kBlock;
        float lanes[kLanes];
        std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
        for (int64_t j0 = 0; j0 < kBlock; j0 += kLanes)
          for (int i = 0; i < kLanes; ++i) {
            const float score = s_g[j0 + i] * scale;
            s_g[j0 + i] = score;
            lanes[i] = visible[j0 + i] ? std::max(lanes[i], score) : lanes[i];
          }
        const float m_new = std::max(m[g], Fold(lanes, Max));
        for (int64_t j = 0; j < kBlock; ++j) {
          const float x = s_g[j] - m_new;
          const float weight = Exp(visible[j] ? x : -87.0f);
          p_g[j] = visible[j] ? weight : 0.0f;
        }
        std::fill(lanes, lanes + kLanes, 0.0f);
        for (int64_t j0 = 0; j0 < kBlock; j0 += kLanes)
          for (int i = 0; i < kLanes; ++i) lanes[i] += p_g[j0 + i];
        // Exactly 1 where the maximum did not move; 0 before the first visible key.
        const float alpha = m_new == m[g] ? 1.0f : std::isinf(m[g]) ? 0.0f : Exp(m[g] - m_new);
        m[g] = m_new;
        l[g] = l[g] * alpha + Fold(lanes, Add);
        for (int64_t d = 0; d < hd; ++d) o[g * hd + d] *= alpha;
      }
      // Outputs o[g] += p[g, j] v[j], key by key in order.
      for (int64_t g = 0; g < G; ++g) AddValues(p.data() + g * kBlock, values, visible, first, end,
                                                o.data() + g * hd);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* out_g = out + (t * H + kv * G + g) * hd;
      for (int64_t d = 0; d < hd; ++d) out_g[d] = o[g * hd + d] / l[g];
    }
  }

};

ffi::Error RowAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k_chunk, ffi::Buffer<ffi::F32> v_chunk,
                            ffi::Buffer<ffi::F32> cache_k, ffi::Buffer<ffi::F32> cache_v,
                            ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> start,
                            ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::S32> own,
                            ffi::ResultBuffer<ffi::F32> out) {
  auto q_dims = q.dimensions(), c_dims = cache_k.dimensions();
  if (q_dims.size() != 3 || c_dims.size() != 5 || c_dims[1] != 1 || q_dims[2] % kLanes)
    return ffi::Error::InvalidArgument(
        "row_attention takes q [T, H, hd] and caches [L, 1, S, KV, hd], hd a multiple of 16");
  Work work;
  work.T = q_dims[0];
  work.H = q_dims[1];
  work.hd = q_dims[2];
  work.S = c_dims[2];
  work.KV = c_dims[3];
  const int64_t layer_size = work.S * work.KV * work.hd;
  const int64_t l = layer.typed_data()[0];
  work.q = q.typed_data();
  work.k_chunk = k_chunk.typed_data();
  work.v_chunk = v_chunk.typed_data();
  work.cache_k = cache_k.typed_data() + l * layer_size;
  work.cache_v = cache_v.typed_data() + l * layer_size;
  work.start = start.typed_data()[0];
  work.last = last.typed_data();
  work.own = own.typed_data();
  work.out = out->typed_data();
  work.scale = 1.0f / std::sqrt(static_cast<float>(work.hd));
  const std::vector<float> zeros(work.hd, 0.0f);
  work.zeros = zeros.data();
  const Work* shared = &work;  // read only, and only while RunTasks waits for its tasks
  clasp_jax::RunTasks(pool, work.T * work.KV,
                      [shared](int64_t i) { shared->Task(i / shared->KV, i % shared->KV); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowAttention, RowAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
