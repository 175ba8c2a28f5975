// Matmuls for a few rows on CPU that stream each weight once at the machine's read rate.
//
// Legend: N rows (tokens), K in_features, O out_features; MoE: T tokens, k experts per token,
// P = T*k (token, expert) pairs, E experts, D hidden, I expert intermediate.
//
// Why: decoding multiplies a few rows by weights far larger than the caches, so a step costs
// what reading its weights costs. oneDNN's inner product pays 15-30 us of fixed cost per call
// and ramps up to its read rate within the call; an MoE layer at batch 1 makes two calls per
// routed expert. Here one call reads all of a layer's routed experts: one parallel loop over
// (expert, block of rows), every thread streaming whole rows, each row multiplied by every
// token routed to that expert while it is in L1.
//
// Numerics: products and sums in fp32 (a bf16 x bf16 product is exact in fp32; with AVX512-BF16
// the products of a pair are summed by one vdpbf16ps before they join the sum); bf16 outputs
// are rounded to nearest even where the reference rounds them (each matmul's output, SiLU, the
// SwiGLU product, the routing weight's product and each sum over the top-k), so a result
// differs from the reference's only by the summation order within a dot product. A row's result
// does not depend on how many other rows share the call.
//
// Portable source: GCC vector extensions, compiled with -march=native on the machine that runs
// it (AVX-512: one zmm per vector; AVX2: two ymm). Where the CPU has AVX512-BF16, bf16 rows are
// multiplied with vdpbf16ps (32 products an instruction, no conversion to fp32 first): on a
// 2-core Xeon with AMX it reads a bf16 lm_head (152064 x 2048) at 1 row ~1.4x faster.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t L = 16;  // lanes of one vector
constexpr int ROWS = 4;    // weight rows per inner block (independent accumulators)
constexpr int TOKS = 4;    // tokens per inner block
using f32v = float __attribute__((vector_size(4 * L)));
using u16v = uint16_t __attribute__((vector_size(2 * L)));
using u32v = uint32_t __attribute__((vector_size(4 * L)));

inline f32v load(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32v load(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  u16v h;
  std::memcpy(&h, p, sizeof h);
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

using f32v8 = float __attribute__((vector_size(32)));
using f32v4 = float __attribute__((vector_size(16)));

inline float hsum(f32v v) {  // a tree of halves: a serial sum of 16 lanes costs 16 latencies
  f32v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// out[n * ldo + r] = dot(w[r, :K], x[n][:K]) for r < NR (<= ROWS), n < NT (<= TOKS).
// w rows ldw apart; x rows of w's type.
template <typename W, int NR, int NT>
inline void block_dot(const W* w, int64_t ldw, const W* const* x, int64_t K, float* out,
                      int64_t ldo) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    __m512 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
      for (int n = 0; n < NT; ++n) acc[r][n] = _mm512_setzero_ps();
    for (; k + 2 * L <= K; k += 2 * L) {
      __m512bh xv[NT];
      for (int n = 0; n < NT; ++n) xv[n] = (__m512bh)_mm512_loadu_si512(x[n] + k);
      for (int r = 0; r < NR; ++r) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * ldw + k);
        for (int n = 0; n < NT; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], wv, xv[n]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int n = 0; n < NT; ++n) {
        float s = _mm512_reduce_add_ps(acc[r][n]);
        for (int64_t j = k; j < K; ++j) s += to_float(w[r * ldw + j]) * to_float(x[n][j]);
        out[n * ldo + r] = s;
      }
    return;
  }
#endif
  f32v acc[NR][NT] = {};
  for (; k + L <= K; k += L) {
    f32v xv[NT];
    for (int n = 0; n < NT; ++n) xv[n] = load(x[n] + k);
    for (int r = 0; r < NR; ++r) {
      f32v wv = load(w + r * ldw + k);
      for (int n = 0; n < NT; ++n) acc[r][n] += wv * xv[n];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NT; ++n) {
      float s = hsum(acc[r][n]);
      for (int64_t j = k; j < K; ++j) s += to_float(w[r * ldw + j]) * to_float(x[n][j]);
      out[n * ldo + r] = s;
    }
}

template <typename W, int NR>
inline void rows_times_tokens(const W* w, int64_t ldw, const W* const* x, int64_t nt,
                              int64_t K, float* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + TOKS <= nt; n += TOKS) block_dot<W, NR, TOKS>(w, ldw, x + n, K, out + n * ldo, ldo);
  switch (nt - n) {
    case 3: block_dot<W, NR, 3>(w, ldw, x + n, K, out + n * ldo, ldo); break;
    case 2: block_dot<W, NR, 2>(w, ldw, x + n, K, out + n * ldo, ldo); break;
    case 1: block_dot<W, NR, 1>(w, ldw, x + n, K, out + n * ldo, ldo); break;
    default: break;
  }
}

// out[n * ldo + r] = dot(w[r], x[n]) for r in [r0, r1), n < nt. out points at row r0's column.
template <typename W>
void rows_dot(const W* w, int64_t ldw, int64_t r0, int64_t r1, const W* const* x, int64_t nt,
              int64_t K, float* out, int64_t ldo) {
  int64_t r = r0;
  for (; r + ROWS <= r1; r += ROWS)
    rows_times_tokens<W, ROWS>(w + r * ldw, ldw, x, nt, K, out + (r - r0), ldo);
  for (; r < r1; ++r) rows_times_tokens<W, 1>(w + r * ldw, ldw, x, nt, K, out + (r - r0), ldo);
}

// v rounded to W's precision (bf16: to nearest even), kept in fp32.
template <typename W>
inline float rnd(float v) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) return static_cast<float>(c10::BFloat16(v));
  return v;
}

// Rows of weight per parallel task: enough that a task's fixed cost is small against reading
// its rows, few enough that the tasks spread over the threads.
int64_t rows_per_task(int64_t rows, int64_t K, int64_t elem) {
  int64_t want = std::max<int64_t>(ROWS, (64 * 1024) / std::max<int64_t>(1, K * elem));
  int64_t threads = at::get_num_threads();
  int64_t even = (rows + threads - 1) / threads;
  return std::max<int64_t>(ROWS, std::min(want, even) / ROWS * ROWS);
}

template <typename W>
const W* rows_of(const at::Tensor& x) {  // x contiguous, of W's dtype
  return reinterpret_cast<const W*>(x.data_ptr());
}

template <typename W>
at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = x.size(0), K = x.size(1), O = w.size(0);
  const at::Tensor xc = x.contiguous();
  std::vector<const W*> xp(N);
  for (int64_t n = 0; n < N; ++n) xp[n] = rows_of<W>(xc) + n * K;
  at::Tensor out = at::empty({N, O}, x.options());
  W* op = reinterpret_cast<W*>(out.data_ptr());
  const W* wp = reinterpret_cast<const W*>(w.data_ptr());
  const int64_t step = rows_per_task(O, K, w.element_size());
  const int64_t tasks = (O + step - 1) / step;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(N * step));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * step, r1 = std::min(O, r0 + step), nr = r1 - r0;
      rows_dot<W>(wp, K, r0, r1, xp.data(), N, K, acc.data(), nr);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t r = 0; r < nr; ++r) op[n * O + r0 + r] = static_cast<W>(acc[n * nr + r]);
    }
  });
  return out;
}

void check_pair(const at::Tensor& x, const at::Tensor& w, int64_t k_dim, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), what, ": x is ", x.scalar_type(),
              ", the weight ", w.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 only, got ", x.scalar_type());
  TORCH_CHECK(w.is_contiguous(), what, ": the weight must be contiguous");
  TORCH_CHECK(x.size(-1) == w.size(k_dim), what, ": x has ", x.size(-1),
              " features, the weight ", w.size(k_dim));
}

// x [N, K] @ w[O, K]^T -> [N, O], in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear: x [N, K] and w [O, K]");
  check_pair(x, w, 1, "linear");
  if (x.scalar_type() == at::kFloat) return linear_impl<float>(x, w);
  return linear_impl<c10::BFloat16>(x, w);
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

template <typename W>
at::Tensor moe_impl(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                    const at::Tensor& gate_up, const at::Tensor& down) {
  const int64_t T = x.size(0), D = x.size(1), k = ids.size(1);
  const int64_t E = gate_up.size(0), I = down.size(2), P = T * k;
  at::Tensor ids64 = ids.to(at::kLong).contiguous();
  at::Tensor wts = weights.to(at::kFloat).contiguous();  // exact: they are in x's dtype
  const int64_t* idp = ids64.data_ptr<int64_t>();
  const float* wtp = wts.data_ptr<float>();

  // The pairs grouped by expert, in token order within an expert.
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(idp[p] >= 0 && idp[p] < E, "moe: expert id ", idp[p], " outside [0, ", E, ")");
    ++count[idp[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  std::vector<int64_t> order(P), fill(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[fill[idp[p]]++] = p;
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) used.push_back(e);

  std::vector<const W*> xrow(P);  // pair (in expert order) -> its token's row
  for (int64_t i = 0; i < P; ++i) xrow[i] = rows_of<W>(x) + (order[i] / k) * D;

  const W* gup = reinterpret_cast<const W*>(gate_up.data_ptr());
  const W* dp = reinterpret_cast<const W*>(down.data_ptr());

  // gate and up rows [i0, i1) of each used expert -> act [P, I] (rows in expert order).
  std::vector<W> act(static_cast<size_t>(P * I));
  const int64_t istep = rows_per_task(I * static_cast<int64_t>(used.size()), D, gate_up.element_size());
  const int64_t iblocks = (I + istep - 1) / istep;
  at::parallel_for(0, static_cast<int64_t>(used.size()) * iblocks, 1, [&](int64_t a, int64_t b) {
    std::vector<float> g, u;
    for (int64_t task = a; task < b; ++task) {
      const int64_t e = used[task / iblocks], i0 = (task % iblocks) * istep;
      const int64_t i1 = std::min(I, i0 + istep), n = count[e + 1] - count[e], nr = i1 - i0;
      const W* const* xs = xrow.data() + count[e];
      g.assign(n * nr, 0.f);
      u.assign(n * nr, 0.f);
      const W* we = gup + e * 2 * I * D;
      rows_dot<W>(we, D, i0, i1, xs, n, D, g.data(), nr);
      rows_dot<W>(we, D, I + i0, I + i1, xs, n, D, u.data(), nr);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t r = 0; r < nr; ++r) {
          const float gv = rnd<W>(g[j * nr + r]), uv = rnd<W>(u[j * nr + r]);
          act[(count[e] + j) * I + i0 + r] = static_cast<W>(rnd<W>(silu(gv)) * uv);
        }
    }
  });

  // down rows [d0, d1) of each used expert -> y [P, D] (rows in expert order).
  std::vector<float> y(static_cast<size_t>(P * D));
  std::vector<const W*> arow(P);
  for (int64_t i = 0; i < P; ++i) arow[i] = act.data() + i * I;
  const int64_t dstep = rows_per_task(D * static_cast<int64_t>(used.size()), I, down.element_size());
  const int64_t dblocks = (D + dstep - 1) / dstep;
  at::parallel_for(0, static_cast<int64_t>(used.size()) * dblocks, 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t e = used[task / dblocks], d0 = (task % dblocks) * dstep;
      const int64_t d1 = std::min(D, d0 + dstep), n = count[e + 1] - count[e];
      rows_dot<W>(dp + e * D * I, I, d0, d1, arow.data() + count[e], n, I,
                  y.data() + count[e] * D + d0, D);
    }
  });

  // out[t] = sum over j of y(t, j) * weight(t, j), in top-k order.
  std::vector<int64_t> where(P);  // pair -> its row in y
  for (int64_t i = 0; i < P; ++i) where[order[i]] = i;
  at::Tensor out = at::empty({T, D}, x.options());
  W* op = reinterpret_cast<W*>(out.data_ptr());
  std::vector<float> sum(static_cast<size_t>(T * D));
  auto y_sum = [&](int64_t t) { return sum.data() + t * D; };
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const float* yr = y.data() + where[t * k + j] * D;
        float* o = y_sum(t);
        const float wt = wtp[t * k + j];
        for (int64_t d = 0; d < D; ++d) {
          const float term = rnd<W>(rnd<W>(yr[d]) * wt);
          o[d] = j == 0 ? term : rnd<W>(o[d] + term);
        }
      }
  });
  for (int64_t i = 0; i < T * D; ++i) op[i] = static_cast<W>(sum[i]);
  return out;
}

// SwiGLU experts for a few tokens: x [T, D]; ids, weights [T, k]; gate_up [E, 2I, D] (gate rows
// first, then up); down [E, D, I] -> [T, D], in x's dtype.
at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
               const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() &&
                  ids.size(0) == x.size(0),
              "moe: x [T, D], ids and weights [T, k]");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && down.size(0) == gate_up.size(0) &&
                  gate_up.size(1) == 2 * down.size(2) && down.size(1) == x.size(1),
              "moe: gate_up [E, 2I, D] and down [E, D, I]");
  check_pair(x, gate_up, 2, "moe");
  check_pair(x, down, 1, "moe");
  at::Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) return moe_impl<float>(xc, ids, weights, gate_up, down);
  return moe_impl<c10::BFloat16>(xc, ids, weights, gate_up, down);
}

}  // namespace

TORCH_LIBRARY(qomni_cpu, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("moe(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor");
}

TORCH_LIBRARY_IMPL(qomni_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
}
