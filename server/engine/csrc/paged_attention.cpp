// Attention that reads the paged KV pool in place, for the CPU.
//
// One work item is (query token, KV head): it walks the token's block table, scores each
// key against every query head that shares this KV head (GQA), takes the softmax of each
// head's row of scores, and sums the values it weights. Nothing is gathered or padded.
// The pool's layout (server/engine/kv_cache.py) is made for this loop: per block and KV
// head, keys transposed (head_dim, block_size) and values (block_size, head_dim).
// A query at position p sees positions 0..p of its own sequence, which is causal inside a
// prefill chunk and "everything cached" for a decode alike.
//
// Accumulation is in float for fp32, bf16 and fp16 pools. Work items are spread over
// PyTorch's own intra-op thread pool (at::parallel_for), so the kernel shares the threads
// the matmuls use instead of starting a second OpenMP runtime.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "scalar_math.h"  // gpt/csrc: to_float, exp_nonpositive

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SOL_BF16_DOT 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using sol::exp_nonpositive;
using sol::to_float;

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxBlockSize = 64;

struct Layout {
  int64_t n_heads, head_dim, kv_heads, block_size, group, max_blocks, head_stride, block_stride, max_len;
  int64_t score_stride;   // floats between two heads' score rows: max_len rounded up to 64 bytes
};

// One (query token, KV head) item. kHeadDim / kBlockSize are the shapes known at compile
// time (0 = read them from `shape`): with them the per-block score vector and the value
// accumulator stay in vector registers. `scores` holds group rows of score_stride floats,
// each starting on a 64-byte boundary.
template <typename T, int64_t kHeadDim, int64_t kBlockSize>
void attend(const Layout& shape, const T* __restrict__ q, const T* __restrict__ k_pool,
            const T* __restrict__ v_pool, const int64_t* __restrict__ table, int64_t length, int64_t kvh,
            float scale, float* __restrict__ scores, T* __restrict__ out) {
  const int64_t head_dim = kHeadDim ? kHeadDim : shape.head_dim;
  const int64_t block_size = kBlockSize ? kBlockSize : shape.block_size;
  const int64_t group = shape.group, stride = shape.score_stride;
  const int64_t n_blocks = (length + block_size - 1) / block_size;

  // Scores: keys are (head_dim, block_size) per block and KV head, so a block's scores
  // accumulate over d as whole vectors of positions. A partly filled last block scores
  // its unused slots too (finite leftovers or zeros); they lie past `length`, never read.
  for (int64_t g = 0; g < group; ++g) {
    float qf[kMaxHeadDim];
    const T* qg = q + g * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) qf[d] = to_float(qg[d]) * scale;
    float* sg = scores + g * stride;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const T* __restrict__ kb = k_pool + table[b] * shape.block_stride + kvh * shape.head_stride;
      float s[kMaxBlockSize];
#pragma omp simd
      for (int64_t j = 0; j < block_size; ++j) s[j] = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float qd = qf[d];
#pragma omp simd
        for (int64_t j = 0; j < block_size; ++j) s[j] += qd * to_float(kb[d * block_size + j]);
      }
#pragma omp simd
      for (int64_t j = 0; j < block_size; ++j) sg[b * block_size + j] = s[j];
    }
  }
  // Softmax over each head's row, then the values it weights.
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * stride;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < length; ++j) mx = std::max(mx, sg[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < length; ++j) {
      sg[j] = exp_nonpositive(sg[j] - mx);
      sum += sg[j];
    }
    float acc[kMaxHeadDim];
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) acc[d] = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t n = std::min(block_size, length - b * block_size);
      const T* __restrict__ vb = v_pool + table[b] * shape.block_stride + kvh * shape.head_stride;
      for (int64_t j = 0; j < n; ++j) {
        const float p = sg[b * block_size + j];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * to_float(vb[j * head_dim + d]);
      }
    }
    const float inv = 1.0f / sum;
    T* og = out + g * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) og[d] = static_cast<T>(acc[d] * inv);
  }
}

#ifdef SOL_BF16_DOT
// bf16 pools on CPUs with AVX512-BF16: `vdpbf16ps` multiplies pairs of bf16 values and
// adds both products to one float lane, so a pair of head dims (scores) or a pair of
// positions (values) costs one instruction, where the generic loop converts every bf16 to
// float and does one fused multiply-add per element. The pool's layout stays as it is:
// one 64-byte load holds key rows d and d+1 of a block (16 positions each), and a word
// permutation interleaves them into the pairs the instruction takes; value rows j and
// j+1 are interleaved the same way from two 32-byte loads. The query pairs are bf16
// already; the softmax weights are rounded to bf16 for the value sum (as a bf16 matmul
// would), their sum is taken in float before rounding. Each head's score and output lane
// keeps one fixed order of additions, so results stay identical batched or alone.
// Compiled where the build targets AVX512-BF16 (a native build on such a CPU); taken for
// block size 16 and head dims that are multiples of 32. Measured (`small`, 128 decodes
// at context 220, one thread, Xeon with AMX): 1.58 ms a layer in the generic bf16 loop
// (2.18 in fp32), 1.28 ms here.
constexpr int64_t kFastBlock = 16;
// Two bf16 values read as one 32-bit word (to broadcast the pair); may alias uint16_t.
typedef int32_t bf16_pair __attribute__((may_alias, aligned(4)));
constexpr int64_t kMaxGroupTile = 4;     // query heads computed together (registers)

// Word indices that interleave two rows of 16 bf16 values: output word 2i takes word i of
// the first row, word 2i+1 word `second + i`. For permutexvar (both rows in one register)
// the second row starts at word 16; for permutex2var (one row per register) at 32. Built
// at compile time, so an item only loads them.
struct InterleaveIndex {
  alignas(64) int16_t words[32];
  constexpr explicit InterleaveIndex(int16_t second) : words{} {
    for (int16_t i = 0; i < 16; ++i) {
      words[2 * i] = i;
      words[2 * i + 1] = static_cast<int16_t>(second + i);
    }
  }
};
constexpr InterleaveIndex kRowsInOneRegister(16), kRowsInTwoRegisters(32);

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// exp_nonpositive on 16 lanes: the same range reduction and polynomial, with the power
// of two applied by vscalefps.
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <int64_t kHeadDim>
void attend_bf16_dot(const Layout& shape, const c10::BFloat16* __restrict__ q,
                     const c10::BFloat16* __restrict__ k_pool, const c10::BFloat16* __restrict__ v_pool,
                     const int64_t* __restrict__ table, int64_t length, int64_t kvh, float scale,
                     float* __restrict__ scores, uint16_t* __restrict__ weights, c10::BFloat16* __restrict__ out) {
  static_assert(kHeadDim % 32 == 0, "head dims are taken 16 at a time, in pairs");
  constexpr int64_t kPairs = kHeadDim / 2, kChunks = kHeadDim / 16;
  const int64_t group = shape.group, stride = shape.score_stride;
  const int64_t n_blocks = (length + kFastBlock - 1) / kFastBlock;
  const __m512i rows_idx = _mm512_load_si512(kRowsInOneRegister.words);
  const __m512i two_idx = _mm512_load_si512(kRowsInTwoRegisters.words);
  const __m512 vscale = _mm512_set1_ps(scale);
  const uint16_t* qbits = reinterpret_cast<const uint16_t*>(q);

  for (int64_t g0 = 0; g0 < group; g0 += kMaxGroupTile) {
    const int64_t gn = std::min(kMaxGroupTile, group - g0);
    // Scores of gn heads, one block (16 positions) at a time. Even and odd head-dim pairs
    // go to two accumulators, so each chain of dependent instructions is half as long.
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint16_t* kb = reinterpret_cast<const uint16_t*>(k_pool + table[b] * shape.block_stride +
                                                             kvh * shape.head_stride);
      if (g0 == 0) {
        // Blocks lie anywhere in the pool, so the hardware prefetcher meets each one cold:
        // fetch the next block's keys and this block's values while this block is scored.
        const char* next_keys = reinterpret_cast<const char*>(
            k_pool + table[std::min(b + 1, n_blocks - 1)] * shape.block_stride + kvh * shape.head_stride);
        const char* values = reinterpret_cast<const char*>(v_pool + table[b] * shape.block_stride +
                                                           kvh * shape.head_stride);
        for (int64_t line = 0; line < kHeadDim * kFastBlock * 2; line += 64) {
          _mm_prefetch(next_keys + line, _MM_HINT_T0);
          _mm_prefetch(values + line, _MM_HINT_T0);
        }
      }
      __m512 acc[kMaxGroupTile][2];
      for (int64_t g = 0; g < kMaxGroupTile; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
      for (int64_t p = 0; p < kPairs; ++p) {
        const __m512i keys = _mm512_permutexvar_epi16(rows_idx, _mm512_loadu_si512(kb + 2 * p * kFastBlock));
        for (int64_t g = 0; g < gn; ++g) {
          const __m512i pair = _mm512_set1_epi32(reinterpret_cast<const bf16_pair*>(qbits + (g0 + g) * kHeadDim)[p]);
          acc[g][p & 1] = _mm512_dpbf16_ps(acc[g][p & 1], (__m512bh)keys, (__m512bh)pair);
        }
      }
      for (int64_t g = 0; g < gn; ++g) {
        _mm512_store_ps(scores + (g0 + g) * stride + b * kFastBlock,
                        _mm512_mul_ps(_mm512_add_ps(acc[g][0], acc[g][1]), vscale));
      }
    }
    // Softmax of each row, 16 lanes at a time (lanes past `length` masked off, so the
    // weights come out zero-padded to whole blocks); the weights are rounded to bf16.
    float inv_sum[kMaxGroupTile];
    for (int64_t g = 0; g < gn; ++g) {
      const float* sg = scores + (g0 + g) * stride;
      uint16_t* wg = weights + g * stride;
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n_blocks * kFastBlock; j += 16) {
        vmax = _mm512_mask_max_ps(vmax, tail_mask(length - j), vmax, _mm512_load_ps(sg + j));
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n_blocks * kFastBlock; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(tail_mask(length - j), exp16_nonpositive(_mm512_sub_ps(
            _mm512_load_ps(sg + j), mx)));
        vsum = _mm512_add_ps(vsum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wg + j), (__m256i)_mm512_cvtneps_pbh(e));
      }
      inv_sum[g] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
    // Values: rows j and j+1 of a block interleaved, weighted by the pair (w_j, w_j+1).
    __m512 acc[kMaxGroupTile][kChunks];
    for (int64_t g = 0; g < kMaxGroupTile; ++g)
      for (int64_t c = 0; c < kChunks; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint16_t* vb = reinterpret_cast<const uint16_t*>(v_pool + table[b] * shape.block_stride +
                                                             kvh * shape.head_stride);
      const int64_t n = std::min(kFastBlock, length - b * kFastBlock);
      for (int64_t j = 0; j < n; j += 2) {
        __m512i w[kMaxGroupTile];
        for (int64_t g = 0; g < gn; ++g) {
          w[g] = _mm512_set1_epi32(*reinterpret_cast<const bf16_pair*>(weights + g * stride + b * kFastBlock + j));
        }
        const uint16_t* row = vb + j * kHeadDim;
        // Past the sequence's last position the pair's second row is the first again (its
        // weight is zero): a slot never written is never read.
        const uint16_t* next = j + 1 < n ? row + kHeadDim : row;
        for (int64_t c = 0; c < kChunks; ++c) {
          const __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 16)));
          const __m512i hi = _mm512_castsi256_si512(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(next + c * 16)));
          const __m512i vals = _mm512_permutex2var_epi16(lo, two_idx, hi);
          for (int64_t g = 0; g < gn; ++g) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], (__m512bh)vals, (__m512bh)w[g]);
        }
      }
    }
    for (int64_t g = 0; g < gn; ++g) {
      uint16_t* og = reinterpret_cast<uint16_t*>(out + (g0 + g) * kHeadDim);
      const __m512 inv = _mm512_set1_ps(inv_sum[g]);
      for (int64_t c = 0; c < kChunks; ++c) {
        const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], inv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(og + c * 16), (__m256i)o);
      }
    }
  }
}
#endif

template <typename T, int64_t kHeadDim, int64_t kBlockSize>
void run_items(const Layout& shape, const T* q, const T* k_pool, const T* v_pool, const int64_t* tokens,
               const int64_t* row_of_token, const int64_t* positions, const int64_t* tables, int64_t n_items,
               float scale, T* out) {
  // Items are dealt round-robin to the workers, not in contiguous ranges: an item's cost
  // grows with its sequence's length, and neighbouring items often share one.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // Score rows start on 64-byte boundaries whatever the batch: the vectorised softmax sum
    // then splits a row into the same lanes every time, so a sequence gets bit-identical
    // results batched or alone (a row's start moving with the batch changed the last bit).
    std::vector<float> storage(shape.group * shape.score_stride + 16);
    float* scores = storage.data();
    while (reinterpret_cast<uintptr_t>(scores) % 64 != 0) ++scores;
#ifdef SOL_BF16_DOT
    constexpr bool kDot = std::is_same_v<T, c10::BFloat16> && kBlockSize == kFastBlock && kHeadDim % 32 == 0 &&
                          kHeadDim > 0;
    std::vector<uint16_t> weights(kDot ? std::min(shape.group, kMaxGroupTile) * shape.score_stride : 0);
#endif
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t item = worker; item < n_items; item += workers) {
        const int64_t t = tokens[item / shape.kv_heads], kvh = item % shape.kv_heads;
        const int64_t head = t * shape.n_heads + kvh * shape.group;   // first query head of the group
        const int64_t* table = tables + row_of_token[t] * shape.max_blocks;
#ifdef SOL_BF16_DOT
        if constexpr (kDot) {
          attend_bf16_dot<kHeadDim>(shape, q + head * shape.head_dim, k_pool, v_pool, table, positions[t] + 1, kvh,
                                    scale, scores, weights.data(), out + head * shape.head_dim);
          continue;
        }
#endif
        attend<T, kHeadDim, kBlockSize>(shape, q + head * shape.head_dim, k_pool, v_pool, table, positions[t] + 1,
                                        kvh, scale, scores, out + head * shape.head_dim);
      }
    }
  });
}

template <typename T>
void paged_attention_impl(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_pool,
                          const at::Tensor& v_pool, const at::Tensor& tokens, const at::Tensor& row_of_token,
                          const at::Tensor& positions, const at::Tensor& block_tables, double scale) {
  Layout shape;
  shape.n_heads = q.size(1);
  shape.head_dim = q.size(2);
  shape.kv_heads = k_pool.size(1);
  shape.block_size = k_pool.size(3);
  shape.group = shape.n_heads / shape.kv_heads;
  shape.max_blocks = block_tables.size(1);
  shape.head_stride = shape.block_size * shape.head_dim;
  shape.block_stride = shape.kv_heads * shape.head_stride;
  shape.max_len = shape.max_blocks * shape.block_size;
  shape.score_stride = (shape.max_len + 15) / 16 * 16;
  TORCH_CHECK(shape.head_dim <= kMaxHeadDim && shape.block_size <= kMaxBlockSize,
              "paged_attention supports head_dim <= ", kMaxHeadDim, " and block_size <= ", kMaxBlockSize);
  const int64_t n_items = tokens.size(0) * shape.kv_heads;
  const auto args = std::make_tuple(q.data_ptr<T>(), k_pool.data_ptr<T>(), v_pool.data_ptr<T>(),
                                    tokens.data_ptr<int64_t>(), row_of_token.data_ptr<int64_t>(),
                                    positions.data_ptr<int64_t>(), block_tables.data_ptr<int64_t>());
  const float fscale = static_cast<float>(scale);
  auto launch = [&](auto kernel) {
    std::apply([&](auto... a) { kernel(shape, a..., n_items, fscale, out.data_ptr<T>()); }, args);
  };
  // The engine's default block size with the usual head sizes get compiled shapes.
  if (shape.block_size == 16 && shape.head_dim == 32) {
    launch(run_items<T, 32, 16>);
  } else if (shape.block_size == 16 && shape.head_dim == 64) {
    launch(run_items<T, 64, 16>);
  } else if (shape.block_size == 16 && shape.head_dim == 128) {
    launch(run_items<T, 128, 16>);
  } else {
    launch(run_items<T, 0, 0>);
  }
}

// out (T, H, D) receives the rows listed in `tokens`; the others are left as they were.
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& tokens, const at::Tensor& row_of_token, const at::Tensor& positions,
                     const at::Tensor& block_tables, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_attention runs on the CPU");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be (tokens, heads, head_dim)");
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.dim() == 4 && k_pool.size(0) == v_pool.size(0) &&
                  k_pool.size(1) == v_pool.size(1) && k_pool.size(2) == v_pool.size(3) &&
                  k_pool.size(3) == v_pool.size(2),
              "pools must be keys (blocks, kv_heads, head_dim, block_size), values (blocks, kv_heads, block_size, "
              "head_dim)");
  TORCH_CHECK(k_pool.size(2) == q.size(2) && q.size(1) % k_pool.size(1) == 0, "head shapes do not match");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(),
              "q, out and the pools must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  v_pool.scalar_type() == q.scalar_type(),
              "q, out and the pools must share a dtype");
  for (const at::Tensor* index : {&tokens, &row_of_token, &positions, &block_tables}) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous(), "index tensors must be contiguous int64");
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      paged_attention_impl<float>(out, q, k_pool, v_pool, tokens, row_of_token, positions, block_tables, scale);
      break;
    case at::kBFloat16:
      paged_attention_impl<c10::BFloat16>(out, q, k_pool, v_pool, tokens, row_of_token, positions, block_tables,
                                          scale);
      break;
    case at::kHalf:
      paged_attention_impl<c10::Half>(out, q, k_pool, v_pool, tokens, row_of_token, positions, block_tables, scale);
      break;
    default:
      TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16");
  }
}

// Store a step's new keys and values in their slots: keys transposed into (head_dim,
// block_size) per block and KV head, values as rows. Two index_put_ calls through permuted
// views did the same at 7 us each for a few tokens and 35 us for 128 (bf16, 2 KV heads of
// 64), twice per layer; this is one pass of plain copies (3 and 16 us).
template <typename T>
void write_kv_impl(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slots) {
  const int64_t kv_heads = k_pool.size(1), head_dim = k_pool.size(2), block_size = k_pool.size(3);
  const int64_t n_tokens = slots.size(0);
  T* kp = static_cast<T*>(k_pool.data_ptr());
  T* vp = static_cast<T*>(v_pool.data_ptr());
  const T* kd = static_cast<const T*>(k.data_ptr());
  const T* vd = static_cast<const T*>(v.data_ptr());
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t ks_h = k.stride(0), ks_t = k.stride(1), ks_d = k.stride(2);
  const int64_t vs_h = v.stride(0), vs_t = v.stride(1), vs_d = v.stride(2);
  const int64_t head_stride = head_dim * block_size, block_stride = kv_heads * head_stride;
  // Tokens own distinct slots, so a long prefill chunk splits over the threads; a decode
  // step's few tokens stay on the calling thread.
  at::parallel_for(0, n_tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slot[t] / block_size, pos = slot[t] % block_size;
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* kb = kp + block * block_stride + h * head_stride + pos;
        T* vb = vp + block * block_stride + h * head_stride + pos * head_dim;
        const T* ks = kd + h * ks_h + t * ks_t;
        const T* vs = vd + h * vs_h + t * vs_t;
        for (int64_t d = 0; d < head_dim; ++d) {
          kb[d * block_size] = ks[d * ks_d];
          vb[d] = vs[d * vs_d];
        }
      }
    }
  });
}

// k, v: (kv_heads, tokens, head_dim), any strides; slots: (tokens,) int64 slot ids.
void write_kv(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.sizes() == at::IntArrayRef({k_pool.size(0), k_pool.size(1), k_pool.size(3),
                                                                      k_pool.size(2)}),
              "pools must be keys (blocks, kv_heads, head_dim, block_size), values (blocks, kv_heads, block_size, "
              "head_dim)");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "the pools must be contiguous");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == k_pool.size(1) && k.size(2) == k_pool.size(2) &&
                  k.size(1) == slots.size(0),
              "k and v must be (kv_heads, tokens, head_dim) matching the pools and the slots");
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == k_pool.scalar_type() &&
                  v_pool.scalar_type() == k_pool.scalar_type(),
              "k, v and the pools must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t capacity = k_pool.size(0) * k_pool.size(3);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " is outside the pool");
  }
  switch (k.scalar_type()) {
    case at::kFloat:
      write_kv_impl<float>(k_pool, v_pool, k, v, slots);
      break;
    case at::kBFloat16:
    case at::kHalf:
      write_kv_impl<uint16_t>(k_pool, v_pool, k, v, slots);   // 2-byte values, copied as they are
      break;
    default:
      TORCH_CHECK(false, "write_kv supports float32, bfloat16 and float16");
  }
}

}  // namespace

TORCH_LIBRARY(sol_paged, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_pool, Tensor v_pool, Tensor tokens, "
        "Tensor row_of_token, Tensor positions, Tensor block_tables, float scale) -> ()");
  m.def("write_kv(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(sol_paged, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv", &write_kv);
}
