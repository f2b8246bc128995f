// CPU paged attention: store the step's new K/V into the paged cache, then attend every new token to its
// sequence's cached context by reading the blocks in place through the block table (no gathered copy).
//
// Layout as in engine/attention/__init__.py: k_cache / v_cache [num_blocks, block_size, num_kv_heads,
// head_dim] (contiguous); q [T, H, D] and k / v [T, Hkv, D] may be strided views with a contiguous last
// dimension. A sequence's q_len new tokens are the last q_len of its seq_len context, and new token i of
// them sees the first seq_len - q_len + i + 1 keys (causal): decodes and prefill chunks are the same case.
//
// One work item is a new token: all its query heads go through the context together, block by block, with
// an online softmax (running max and sum, rescaled per block); the query heads of a GQA group read the
// same key and value rows. Accumulation is in float32 whatever the cache dtype.
// Compiled with -O3 -march=native -ffast-math: the loops over head_dim (a compile-time constant)
// vectorize, and so do the exponentials (glibc's vector expf). The code never relies on infinities.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

template <typename T, int D>
void store_kv(const at::Tensor& x, at::Tensor& cache, const int64_t* slots) {
  const int64_t tokens = x.size(0), heads = x.size(1), st = x.stride(0), sh = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  T* dst = cache.data_ptr<T>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;  // padding token
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (slots[t] * heads + h) * D, src + t * st + h * sh, D * sizeof(T));
  }
}

template <typename T, int D>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_tables,
            double scale, at::Tensor& out) {
  const int64_t num_seqs = seq_lens.size(0), heads = q.size(1);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int32_t* starts = query_start_loc.const_data_ptr<int32_t>();
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0), q_st = q.stride(0), q_sh = q.stride(1);
  const int64_t row = kv_heads * D, block_stride = block_size * row;  // cache strides: token, block
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  T* op = out.data_ptr<T>();

  // Each new token's sequence and how many keys it sees.
  const int64_t first = starts[0], tokens = starts[num_seqs] - first;
  std::vector<int32_t> token_seq(tokens), token_keys(tokens);
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int32_t t = starts[s]; t < starts[s + 1]; ++t) {
      token_seq[t - first] = s;
      token_keys[t - first] = lens[s] - (starts[s + 1] - t) + 1;
    }

  // One work item per new token, all its heads together: a cache block is read front to back (its rows
  // interleave the KV heads), which the hardware prefetcher follows; a block read one head's slice at a
  // time strides 1 KB and stalls on memory.
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(heads * (2 * D + block_size + 2));
    float* qf = buf.data();              // [H, D] scaled queries
    float* acc = qf + heads * D;         // [H, D] running sum of p * v
    float* p = acc + heads * D;          // [H, block_size] scores, then probabilities, of one block
    float* m = p + heads * block_size;   // [H] running max
    float* l = m + heads;                // [H] running sum of probabilities
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = first + w, s = token_seq[w], keys = token_keys[w];
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = qp + t * q_st + h * q_sh;
#pragma omp simd
        for (int d = 0; d < D; ++d) {
          qf[h * D + d] = static_cast<float>(src[d]) * static_cast<float>(scale);
          acc[h * D + d] = 0.f;
        }
        l[h] = 0.f;
      }
      for (int64_t start = 0; start < keys; start += block_size) {
        const int64_t n = std::min(block_size, keys - start);
        const int64_t base = tables[s * table_stride + start / block_size] * block_stride;
        const T* kb = kp + base;
        const T* vb = vp + base;
        float row_f[D];  // one key or value row of one KV head, read once for the query heads of its group
        for (int64_t j = 0; j < n; ++j)
          for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
            const T* kj = kb + j * row + kvh * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) row_f[d] = static_cast<float>(kj[d]);
            for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int d = 0; d < D; ++d) dot += qf[h * D + d] * row_f[d];
              p[h * block_size + j] = dot;
            }
          }
        for (int64_t h = 0; h < heads; ++h) {
          float* ph = p + h * block_size;
          float block_max = ph[0];
          for (int64_t j = 1; j < n; ++j) block_max = std::max(block_max, ph[j]);
          // The first block sets the running max; later ones rescale what came before (factor <= 1).
          const float new_max = start == 0 ? block_max : std::max(m[h], block_max);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            ph[j] = std::exp(ph[j] - new_max);
            sum += ph[j];
          }
          if (start > 0 && new_max > m[h]) {
            const float factor = std::exp(m[h] - new_max);
            l[h] *= factor;
#pragma omp simd
            for (int d = 0; d < D; ++d) acc[h * D + d] *= factor;
          }
          m[h] = new_max;
          l[h] += sum;
        }
        for (int64_t j = 0; j < n; ++j)
          for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
            const T* vj = vb + j * row + kvh * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) row_f[d] = static_cast<float>(vj[d]);
            for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
              const float pj = p[h * block_size + j];
#pragma omp simd
              for (int d = 0; d < D; ++d) acc[h * D + d] += pj * row_f[d];
            }
          }
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* dst = op + (t * heads + h) * D;
        const float inv = 1.f / l[h];
#pragma omp simd
        for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[h * D + d] * inv);
      }
    }
  });
}

template <typename T, int D>
at::Tensor run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
               const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale) {
  store_kv<T, D>(k, k_cache, slot_mapping.const_data_ptr<int64_t>());
  store_kv<T, D>(v, v_cache, slot_mapping.const_data_ptr<int64_t>());
  at::Tensor out = at::empty(q.sizes(), q.options());
  attend<T, D>(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out);
  return out;
}

template <typename T>
at::Tensor run_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                   const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale) {
  switch (q.size(2)) {
#define HALFFULL_HEAD_DIM(D) \
  case D: return run<T, D>(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables, scale);
    HALFFULL_HEAD_DIM(16) HALFFULL_HEAD_DIM(32) HALFFULL_HEAD_DIM(64) HALFFULL_HEAD_DIM(80)
    HALFFULL_HEAD_DIM(96) HALFFULL_HEAD_DIM(128) HALFFULL_HEAD_DIM(256)
#undef HALFFULL_HEAD_DIM
  }
  TORCH_CHECK(false, "paged_attention: head_dim ", q.size(2), " not compiled (16, 32, 64, 80, 96, 128, 256)");
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                           at::Tensor v_cache, const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 4, "paged_attention: bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "paged_attention: head_dim not contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: cache not contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: q, k, v and the caches need one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && k.size(1) == k_cache.size(2) && k.size(2) == q.size(2) &&
              k_cache.size(3) == q.size(2), "paged_attention: head counts or head_dim disagree");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && query_start_loc.scalar_type() == at::kInt &&
              seq_lens.scalar_type() == at::kInt && block_tables.scalar_type() == at::kInt,
              "paged_attention: metadata dtypes");
  TORCH_CHECK(block_tables.stride(1) == 1 && query_start_loc.is_contiguous() && seq_lens.is_contiguous() &&
              slot_mapping.is_contiguous(), "paged_attention: metadata not contiguous");
  if (q.scalar_type() == at::kFloat)
    return run_dim<float>(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables, scale);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_attention: float32 or bfloat16 only");
  return run_dim<c10::BFloat16>(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
                                scale);
}

}  // namespace

TORCH_LIBRARY(halffull_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor query_start_loc, Tensor seq_lens, Tensor block_tables, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
}
