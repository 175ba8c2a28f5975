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
// does not depend on how many other rows share the call, except that with AMX (below) bf16
// tokens are summed in tiles from AMX_MIN_TOKENS tokens of a weight (of an expert) on, and that
// int4 and int8 weights are dequantized to bf16 from a few tokens on without AMX
// (Q4_DEQUANT_MIN_TOKENS, Q8_DEQUANT_MIN_TOKENS).
//
// Portable source: GCC vector extensions, compiled with -march=native on the machine that runs
// it (AVX-512: one zmm per vector; AVX2: two ymm). Where the CPU has AVX512-BF16, bf16 rows are
// multiplied with vdpbf16ps (32 products an instruction, no conversion to fp32 first): on a
// 2-core Xeon with AMX it reads a bf16 lm_head (152064 x 2048) at 1 row ~1.4x faster. Where it
// has AMX, 4 tokens or more of bf16 run as tiles: the dot-product rate no longer bounds them
// (the medium lm_head 151936 x 512, 8 tokens: 24.1 -> 12.8 ms; an MoE layer of 120 tokens,
// 16 experts top-4, D 512: faster than oneDNN's grouped GEMM, 2.1 against 3.4 ms).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__) || (defined(__AMX_TILE__) && defined(__AMX_BF16__))
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define QOMNI_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vec.h"

namespace {

using namespace qomni::vec;
constexpr int ROWS = 4;    // weight rows per inner block (independent accumulators)
constexpr int TOKS = 4;    // tokens per inner block
// How far ahead of its reads a weight stream asks for its weight: the hardware prefetcher alone
// leaves the read rate falling as the products per byte grow (the medium lm_head 152064 x 512,
// fp32, 2-core Xeon, 1 / 2 / 8 rows: 17.4 / 19.5 / 25.9 ms -> 15.2 / 15.7 / 22.0; bf16 1 row
// 10.8 -> 8.6; rows of 2048 as before). Into L2, not L1 (prefetcht1): a 16 KB lead in L1 evicts
// what is being read (2-core Zen 4, one token, 2 threads, GB/s over 4 alternated runs on a noisy
// host: int4 4096 x 2048 12-16 -> 22-27, the int4 MoE of 8 routed experts 13-19 -> 20-28, the
// int8 lm_head 22-24 -> 26-27, bf16 6144 x 2048 21-28 -> 29-48).
constexpr int64_t AHEAD_BYTES = 16 * 1024;
inline void read_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + AHEAD_BYTES, 0, 2);
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
        read_ahead(w + r * ldw + k);
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
      read_ahead(w + r * ldw + k);
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
  // fp32, 8 tokens or more: blocks of 2 rows x 8 tokens, each row read once for all 8 (on a
  // 2-core Zen 4 the fp32 lm_head 152064 x 2048 at 8 rows: 49-55 -> 43-45 ms, alternated runs;
  // 4 rows x 4 tokens read every row twice). A result's sums are the same in either block.
  if constexpr (NR == ROWS && std::is_same_v<W, float>)
    for (; n + 8 <= nt; n += 8)
      for (int r = 0; r < NR; r += 2)
        block_dot<W, 2, 8>(w + r * ldw, ldw, x + n, K, out + n * ldo + r, ldo);
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

// -- AMX (bf16 rows, where the CPU has tile instructions) ----------------------------------------
//
// One TDPBF16PS multiplies 16 weight rows by 16 tokens over 32 of K: C[o][t] += sum over the
// pairs j of w[o][2j..2j+1] . x[t][2j..2j+1], in fp32. The weight tile is read straight from
// the [O, K] weight (16 rows, 64 bytes each); the tokens are packed once per call into AMX's
// pair layout. A token's result is the same whatever other tokens share the call.

constexpr int64_t TILE = 16;  // rows of a tile: weight rows, or tokens
constexpr int64_t TILE_K = 32;  // bf16 values of K in a tile row (64 bytes)
constexpr int64_t PREFETCH_TILES = 4;  // weight tiles read ahead

#if defined(QOMNI_AMX)
// Linux hands AMX's tile state only to processes that ask for it (once, for all threads).
bool amx_ready() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (16 x 16 fp32); 4, 5: weight rows; 6, 7: tokens. All 16 rows of 64 bytes.
struct Tiles {
  Tiles() {
    TileConfig c;
    for (int i = 0; i < 8; ++i) c.rows[i] = TILE, c.colsb[i] = 64;
    _tile_loadconfig(&c);
  }
  ~Tiles() { _tile_release(); }
};
#else
bool amx_ready() { return false; }
#endif

// AMX applies to bf16 weights whose K is whole tile rows, for AMX_MIN_TOKENS tokens or more.
// Fewer stream faster with vdpbf16ps: a tile reads 16 rows at once (a 4096 x 2048 weight, 1
// token: 0.78 ms against 0.58; 4 tokens: 0.77 against 0.80; 8: 0.80 against 1.70).
constexpr int64_t AMX_MIN_TOKENS = 4;

template <typename W>
bool use_amx(int64_t K, int64_t tokens) {
  return std::is_same_v<W, c10::BFloat16> && K % TILE_K == 0 && K > 0 &&
         tokens >= AMX_MIN_TOKENS && amx_ready();
}

// Tokens in AMX's pair layout: for block b of 16 tokens, pair j, token t: the 32-bit word
// holding x[16b + t][2j], x[16b + t][2j + 1] at [(b * K / 2 + j) * 16 + t]; missing tokens 0.
template <typename W>
std::vector<uint32_t> pack_pairs(const W* const* x, int64_t nt, int64_t K) {
  const int64_t pairs = K / 2, blocks = (nt + TILE - 1) / TILE;
  std::vector<uint32_t> p(static_cast<size_t>(blocks * pairs * TILE), 0);
  for (int64_t t = 0; t < nt; ++t) {
    uint32_t* dst = p.data() + (t / TILE) * pairs * TILE + t % TILE;
    for (int64_t j = 0; j < pairs; ++j) std::memcpy(dst + j * TILE, x[t] + 2 * j, 4);
  }
  return p;
}

#if defined(QOMNI_AMX)
// C for MA x 16 weight rows (from w, rows ldw apart) and NB x 16 tokens (blocks b0, b1 of the
// pair layout): c[o * 32 + t], o < 16 MA, t < 16 NB.
template <int MA, int NB>
inline void amx_block(const c10::BFloat16* w, int64_t ldw, const uint32_t* b0,
                      const uint32_t* b1, int64_t K, float* c) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MA == 2) _tile_zero(2);
  if constexpr (MA == 2 && NB == 2) _tile_zero(3);
  const int64_t wstride = ldw * 2;
  for (int64_t kb = 0; kb < K / TILE_K; ++kb) {
    if (kb + PREFETCH_TILES < K / TILE_K)  // 16 rows at a time outrun the hardware prefetcher
      for (int64_t o = 0; o < MA * TILE; ++o)
        _mm_prefetch(reinterpret_cast<const char*>(w + o * ldw + (kb + PREFETCH_TILES) * TILE_K),
                     _MM_HINT_T0);
    _tile_loadd(4, w + kb * TILE_K, wstride);
    _tile_loadd(6, b0 + kb * TILE * TILE, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, b1 + kb * TILE * TILE, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MA == 2) {
      _tile_loadd(5, w + TILE * ldw + kb * TILE_K, wstride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t ldc = 2 * TILE * 4;  // bytes per row of c
  _tile_stored(0, c, ldc);
  if constexpr (NB == 2) _tile_stored(1, c + TILE, ldc);
  if constexpr (MA == 2) _tile_stored(2, c + TILE * 2 * TILE, ldc);
  if constexpr (MA == 2 && NB == 2) _tile_stored(3, c + TILE * 2 * TILE + TILE, ldc);
}

// c [16 rows of weight][16 tokens] (rows ldc floats apart) -> out[n * ldo + o] for the first
// `tokens` tokens: a 16 x 16 transpose in registers (as scalars it took a third of the time).
inline void store_transposed(const float* c, int64_t ldc, int64_t tokens, float* out,
                             int64_t ldo) {
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + i * ldc);
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: pairs of rows interleaved
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  for (int i = 0; i < 16; i += 4) {  // u[i + m], lane l: token 4l + m of rows i..i+3
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i]), pd(t[i + 2])));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i]), pd(t[i + 2])));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i + 1]), pd(t[i + 3])));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i + 1]), pd(t[i + 3])));
  }
  for (int m = 0; m < 4; ++m) {  // the lanes gathered: tokens m, 4 + m, 8 + m, 12 + m
    const __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    const __m512 col[4] = {_mm512_shuffle_f32x4(v0, w0, 0x88), _mm512_shuffle_f32x4(v1, w1, 0x88),
                           _mm512_shuffle_f32x4(v0, w0, 0xDD), _mm512_shuffle_f32x4(v1, w1, 0xDD)};
    for (int q = 0; q < 4; ++q) {
      const int64_t n = 4 * q + m;
      if (n < tokens) _mm512_storeu_ps(out + n * ldo, col[q]);
    }
  }
}

// rows_dot for whole tiles of rows: out[n * ldo + r] for r in [r0, r0 + 16 m), n < nt, the
// tokens packed by pack_pairs.
void rows_dot_amx(const c10::BFloat16* w, int64_t ldw, int64_t r0, int64_t r1,
                  const uint32_t* pairs, int64_t nt, int64_t K, float* out, int64_t ldo) {
  Tiles tiles;
  alignas(64) float c[2 * TILE * 2 * TILE];
  const int64_t blocks = (nt + TILE - 1) / TILE, block_words = K / 2 * TILE;
  for (int64_t r = r0; r + TILE <= r1;) {
    const int ma = r + 2 * TILE <= r1 ? 2 : 1;
    const c10::BFloat16* wr = w + r * ldw;
    for (int64_t b = 0; b < blocks; b += 2) {
      const uint32_t* b0 = pairs + b * block_words;
      const bool two = b + 1 < blocks;
      if (ma == 2 && two) amx_block<2, 2>(wr, ldw, b0, b0 + block_words, K, c);
      else if (ma == 2) amx_block<2, 1>(wr, ldw, b0, nullptr, K, c);
      else if (two) amx_block<1, 2>(wr, ldw, b0, b0 + block_words, K, c);
      else amx_block<1, 1>(wr, ldw, b0, nullptr, K, c);
      for (int64_t bb = b; bb < std::min(blocks, b + 2); ++bb)
        for (int64_t m = 0; m < ma; ++m)
          store_transposed(c + m * TILE * 2 * TILE + (bb - b) * TILE, 2 * TILE,
                           std::min(TILE, nt - bb * TILE),
                           out + bb * TILE * ldo + (r - r0) + m * TILE, ldo);
    }
    r += ma * TILE;
  }
}
#endif

// The tokens of one rows_dot: their rows, and (where AMX applies) the same in pair layout.
template <typename W>
struct Tokens {
  const W* const* rows;
  int64_t n;
  const uint32_t* pairs = nullptr;
};

// out[n * ldo + r] = dot(w[r], x[n]) for r in [r0, r1): whole tiles of rows with AMX where the
// tokens come packed, the other rows as rows_dot.
template <typename W>
void rows_dot_any(const W* w, int64_t ldw, int64_t r0, int64_t r1, const Tokens<W>& x, int64_t K,
              float* out, int64_t ldo) {
  int64_t r = r0;
#if defined(QOMNI_AMX)
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (x.pairs != nullptr) {
      r = r0 + (r1 - r0) / TILE * TILE;
      if (r > r0) rows_dot_amx(w, ldw, r0, r, x.pairs, x.n, K, out, ldo);
    }
  }
#endif
  if (r < r1) rows_dot<W>(w, ldw, r, r1, x.rows, x.n, K, out + (r - r0), ldo);
}


// Rows of weight per parallel task: enough that a task's fixed cost is small against reading
// its rows, few enough that the tasks spread over the threads.
// With AMX, whole tiles of 16 rows (`unit`).
int64_t rows_per_task(int64_t rows, int64_t row_bytes, int64_t unit = ROWS) {
  int64_t want = std::max<int64_t>(unit, (64 * 1024) / std::max<int64_t>(1, row_bytes));
  int64_t threads = at::get_num_threads();
  int64_t even = (rows + threads - 1) / threads;
  return std::max<int64_t>(unit, std::min(want, even) / unit * unit);
}

template <typename W>
const W* rows_of(const at::Tensor& x) {  // x contiguous, of W's dtype
  return reinterpret_cast<const W*>(x.data_ptr());
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// -- the elementwise work around the matmuls, a vector at a time ----------------------------------
// (At prefill sizes the SwiGLU and the weighted sum over the top k cost as much as the matmuls
// when done one value at a time: std::exp and each bf16 rounding are scalar calls.)

inline f32v silu_v(f32v v) { return v / (1.f + exp_v(-v)); }


// -- the weights a matmul reads: dense rows, or int4 in groups -----------------------------------
//
// `dot(e, r0, r1, x, out, ldo)`: out[n * ldo + r - r0] = dot(row r of weight e, token n) for r in
// [r0, r1). `row_bytes`: what one row reads (it sizes the parallel tasks).

template <typename W>
struct Dense {  // E weights [E, O, K] of W
  const W* w;
  int64_t O, K;
  int64_t row_bytes() const { return K * static_cast<int64_t>(sizeof(W)); }
  void dot(int64_t e, int64_t r0, int64_t r1, const Tokens<W>& x, float* out, int64_t ldo) const {
    rows_dot_any<W>(w + e * O * K, K, r0, r1, x, K, out, ldo);
  }
};

// int4 weights in groups (weight-only quantization; qomni/quant/kernels.py packs them):
// w[r][k] = (u - 8) * s[r][g] - zs[r][g], u the unsigned nibble, g = k / group, zs = zero * s
// (absent for symmetric schemes). A row is K / 128 blocks of 64 bytes, read as 32 16-bit words:
// nibble c (bits 4c..4c+3) of word i holds value 32c + i of the block, so each nibble position
// of a block's words is 32 consecutive values, which with AVX512-BF16 one vpermw turns into bf16
// (exact: -8..7) and one vdpbf16ps multiplies by the token. Products are summed per group in
// fp32 and scaled once per group.
constexpr int64_t Q4_BLOCK = 128;  // values in 64 bytes
constexpr int Q4_ROWS = 4;  // rows per inner block (2 was ~20 % slower: 6144 x 2048, 1 token)
constexpr int Q4_TOKS = 2;  // tokens per inner block (registers: 4 rows x 2 tokens x 2 sums)
using BF16 = c10::BFloat16;

#if defined(__AVX512BF16__)
alignas(64) constexpr uint16_t Q4_TABLE[32] = {  // bf16 of (i % 16) - 8: index bit 4 ignored
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

// res[r][n] = sum over groups of s[r][g] * (products of group g). The products of a group are
// one chain of vdpbf16ps per row and token, scaled into the total at the group's end (the 4
// products of a block overlap with the next block's: the chains are independent). Without AMX
// the kernel is bound by its count of zmm instructions, which every row costs in full: a sum
// per nibble position, added up at each group's end, took 15 a block where this takes 12
// (2-core Zen 4, one thread, L2-resident rows: 2.5 -> 2.2 ns a block of a row).
// FLUSHES: groups ending per 128-value block (1: groups of one block, 2: of 64, 4: of 32; 0: of
// several blocks), fixed at compile time so that every sum stays in a register (a group test
// after each nibble position made GCC keep them on the stack: 3.5x slower; a block count known
// only at run time made groups of 128 ~1.5x slower than groups of 64 at one token).
template <int NR, int NT, int FLUSHES>
inline void q4_dot_avx512(const uint8_t* q, const float* s, int64_t K, int64_t G,
                          int64_t group, const BF16* const* x, float (&res)[NR][NT]) {
  const int64_t ldq = K / 2, blocks = FLUSHES == 0 ? group / Q4_BLOCK : 1;
  const __m512i table = _mm512_load_si512(Q4_TABLE);
  __m512 tot[NR][NT], acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NT; ++n) tot[r][n] = acc[r][n] = _mm512_setzero_ps();
  auto flush = [&](int64_t g) {  // a group ends: its sums scaled into the totals
    for (int r = 0; r < NR; ++r) {
      const __m512 sc = _mm512_set1_ps(s[r * G + g]);
      for (int n = 0; n < NT; ++n) {
        tot[r][n] = _mm512_fmadd_ps(acc[r][n], sc, tot[r][n]);
        acc[r][n] = _mm512_setzero_ps();
      }
    }
  };
  int64_t g = 0;
  for (int64_t k0 = 0; k0 < K;) {
    for (int64_t b = 0; b < blocks; ++b, k0 += Q4_BLOCK) {
      __m512i words[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = q + r * ldq + k0 / 2;
        read_ahead(p);
        words[r] = _mm512_loadu_si512(p);
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        __m512bh xv[NT];
        for (int n = 0; n < NT; ++n) xv[n] = (__m512bh)_mm512_loadu_si512(x[n] + k0 + 32 * c);
        for (int r = 0; r < NR; ++r) {
          const __m512i idx = c == 0 ? words[r] : _mm512_srli_epi16(words[r], 4 * c);
          const __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(idx, table);
          for (int n = 0; n < NT; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], wv, xv[n]);
        }
        if (FLUSHES == 4 || (FLUSHES == 2 && c % 2 == 1)) flush(g++);
      }
    }
    if (FLUSHES <= 1) flush(g++);
  }
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NT; ++n) res[r][n] = _mm512_reduce_add_ps(tot[r][n]);
}
#endif

// out[n * ldo + r] = dot(row r, x[n]) for r < NR, n < NT; q, s, zs at row 0 of the block.
template <int NR, int NT>
inline void q4_block_dot(const uint8_t* q, const float* s, const float* zs, int64_t K, int64_t G,
                         int64_t group, const BF16* const* x, const float* xsum, float* out,
                         int64_t ldo) {
  float res[NR][NT];
#if defined(__AVX512BF16__)
  if (group == Q4_BLOCK) q4_dot_avx512<NR, NT, 1>(q, s, K, G, group, x, res);
  else if (group % Q4_BLOCK == 0) q4_dot_avx512<NR, NT, 0>(q, s, K, G, group, x, res);
  else if (group == 64) q4_dot_avx512<NR, NT, 2>(q, s, K, G, group, x, res);
  else q4_dot_avx512<NR, NT, 4>(q, s, K, G, group, x, res);
#else
  const int64_t ldq = K / 2;
  f32v tot[NR][NT] = {}, acc[NR][NT] = {};
  int64_t g = 0, g_end = group;
  for (int64_t k0 = 0; k0 < K; k0 += Q4_BLOCK)
    for (int c = 0; c < 4; ++c) {
      const int64_t kc = k0 + 32 * c;
      for (int h = 0; h < 2; ++h) {  // 16 of the 32 words
        f32v xv[NT];
        for (int n = 0; n < NT; ++n) xv[n] = load(x[n] + kc + L * h);
        for (int r = 0; r < NR; ++r) {
          u16v w;
          std::memcpy(&w, q + r * ldq + k0 / 2 + 2 * L * h, sizeof w);
          const f32v wv = __builtin_convertvector((w >> (4 * c)) & 15, f32v) - 8.f;
          for (int n = 0; n < NT; ++n) acc[r][n] += wv * xv[n];
        }
      }
      if (kc + 32 == g_end) {
        for (int r = 0; r < NR; ++r)
          for (int n = 0; n < NT; ++n) {
            tot[r][n] += acc[r][n] * s[r * G + g];
            acc[r][n] = f32v{};
          }
        ++g, g_end += group;
      }
    }
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NT; ++n) res[r][n] = hsum(tot[r][n]);
#endif
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NT; ++n) {
      float v = res[r][n];
      if (zs != nullptr)
        for (int64_t j = 0; j < G; ++j) v -= zs[r * G + j] * xsum[n * G + j];
      out[n * ldo + r] = v;
    }
}

template <int NR>
inline void q4_rows_times_tokens(const uint8_t* q, const float* s, const float* zs, int64_t K,
                                 int64_t G, int64_t group, const BF16* const* x, int64_t nt,
                                 const float* xsum, float* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + Q4_TOKS <= nt; n += Q4_TOKS)
    q4_block_dot<NR, Q4_TOKS>(q, s, zs, K, G, group, x + n, xsum + n * G, out + n * ldo, ldo);
  if (n < nt) q4_block_dot<NR, 1>(q, s, zs, K, G, group, x + n, xsum + n * G, out + n * ldo, ldo);
}

// Rows [r0, r1) of an int4 weight as bf16 [r1 - r0, K] (rows ldo apart), rounded to nearest
// even.
void q4_dequantize(const uint8_t* q, const float* s, const float* zs, int64_t K, int64_t G,
                   int64_t group, int64_t r0, int64_t r1, BF16* out, int64_t ldo) {
#if defined(__AVX512BF16__)
  // Per group, its 16 values in bf16 as a table; each nibble position of a block's words (32
  // values, all in one group: groups are multiples of 32) is then one shift and one vpermw.
  const __m512 u = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
  thread_local std::vector<__m512i> tables;  // kept: a prefill calls this once per task
  tables.resize(static_cast<size_t>(G));
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float sc = s[r * G + g], z = zs == nullptr ? 0.f : zs[r * G + g];
      const __m512 v = _mm512_fmsub_ps(u, _mm512_set1_ps(sc), _mm512_set1_ps(z));
      tables[g] = _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(v));
    }
    int64_t g = 0, g_end = group;
    for (int64_t k0 = 0; k0 < K; k0 += Q4_BLOCK) {
      const uint8_t* p = q + r * (K / 2) + k0 / 2;
      read_ahead(p);
      const __m512i words = _mm512_loadu_si512(p);
      BF16* o = out + (r - r0) * ldo + k0;
      for (int c = 0; c < 4; ++c) {
        if (k0 + 32 * c == g_end) ++g, g_end += group;
        const __m512i idx = c == 0 ? words : _mm512_srli_epi16(words, 4 * c);
        _mm512_storeu_si512(o + 32 * c, _mm512_permutexvar_epi16(idx, tables[g]));
      }
    }
  }
  return;
#endif
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k0 = 0; k0 < K; k0 += Q4_BLOCK)
      for (int h = 0; h < 2; ++h) {
        u16v w;
        std::memcpy(&w, q + r * (K / 2) + k0 / 2 + 2 * L * h, sizeof w);
        for (int c = 0; c < 4; ++c) {
          const int64_t k = k0 + 32 * c + L * h, g = r * G + k / group;
          const f32v u = __builtin_convertvector((w >> (4 * c)) & 15, f32v) - 8.f;
          const f32v v = zs == nullptr ? u * s[g] : u * s[g] - zs[g];
          store<BF16>(out + (r - r0) * ldo + k, rnd_v<BF16>(v));
        }
      }
}

// Without AMX, from a few tokens of a weight on, a task's int4 or int8 rows are dequantized to
// bf16 once and multiplied by its tokens TOKEN_CHUNK at a time (they stay in L2 while the rows
// are read again): the int4 nibble path turns each row into bf16 again for every 2 tokens and
// streams all tokens past every 2 rows (int8: every 4). 2-core Zen 4: int4 4096 x 2048, 2 / 4 /
// 64 / 390 tokens: 0.53 / 0.99 / 16.9 / 95.7 ms -> 0.31 / 0.36 / 3.0 / 18.2 (torch's bf16 matmul
// of the dequantized weight: 0.59 / 0.65 / 3.0 / 16.0), 1 token stays on the nibble path (0.19);
// int8 4304 x 1152, 4 / 8 / 64 / 1024 tokens: 0.34 / 0.67 / 5.6 / 86.9 -> 0.38 / 0.48 / 1.9 /
// 27.4 (torch 0.26 / 0.34 / 1.6 / 23.2), and the 152064 x 2048 lm_head at 2 tokens 10.5 -> 26.3
// (writing 0.6 GB of bf16 rows costs more than two tokens' products), at 8 40.7 -> 34.3.
constexpr int64_t Q4_DEQUANT_MIN_TOKENS = 2;
constexpr int64_t Q8_DEQUANT_MIN_TOKENS = 8;
constexpr int64_t TOKEN_CHUNK = 32;

bool dequantize_first(const Tokens<BF16>& x, int64_t min_tokens) {
  return x.pairs != nullptr || (!amx_ready() && x.n >= min_tokens);
}

// out[n * ldo + r - r0] for r in [r0, r1): the rows as bf16 (`fill(rows, ldw)` writes them, rows
// ldw apart), then as tiles (AMX) or by vdpbf16ps. Rows a line more than K apart: at 4 KB apart
// a tile's 16 rows share one L1 set.
template <typename Fill>
void dequantized_dot(int64_t K, int64_t r0, int64_t r1, const Tokens<BF16>& x, float* out,
                     int64_t ldo, Fill fill) {
  const int64_t ldw = K + 32;
  thread_local std::vector<BF16> rows;
  rows.resize(static_cast<size_t>((r1 - r0) * ldw));
  fill(rows.data(), ldw);
  if (x.pairs != nullptr) {
    rows_dot_any<BF16>(rows.data(), ldw, 0, r1 - r0, x, K, out, ldo);
    return;
  }
  for (int64_t n = 0; n < x.n; n += TOKEN_CHUNK)
    rows_dot<BF16>(rows.data(), ldw, 0, r1 - r0, x.rows + n, std::min(TOKEN_CHUNK, x.n - n), K,
                   out + n * ldo, ldo);
}

struct Q4 {  // E weights: q uint8 [E, O, K / 2], s and zs fp32 [E, O, G]
  const uint8_t* q;
  const float* s;
  const float* zs;  // nullptr: symmetric
  int64_t O, K, G, group;
  int64_t row_bytes() const { return K / 2 + G * 4; }
  void dot(int64_t e, int64_t r0, int64_t r1, const Tokens<BF16>& x, float* out,
           int64_t ldo) const {
    const uint8_t* qe = q + e * O * (K / 2);
    const float *se = s + e * O * G, *ze = zs == nullptr ? nullptr : zs + e * O * G;
    if (dequantize_first(x, Q4_DEQUANT_MIN_TOKENS)) {
      dequantized_dot(K, r0, r1, x, out, ldo, [&](BF16* rows, int64_t ldw) {
        q4_dequantize(qe, se, ze, K, G, group, r0, r1, rows, ldw);
      });
      return;
    }
    std::vector<float> xsum;  // each token's sum per group, for the zero points
    if (ze != nullptr) {
      xsum.assign(static_cast<size_t>(x.n * G), 0.f);
      for (int64_t n = 0; n < x.n; ++n)
        for (int64_t k = 0; k < K; ++k) xsum[n * G + k / group] += to_float(x.rows[n][k]);
    }
    int64_t r = r0;
    for (; r + Q4_ROWS <= r1; r += Q4_ROWS)
      q4_rows_times_tokens<Q4_ROWS>(qe + r * (K / 2), se + r * G, ze ? ze + r * G : nullptr, K, G,
                                 group, x.rows, x.n, xsum.data(), out + (r - r0), ldo);
    for (; r < r1; ++r)
      q4_rows_times_tokens<1>(qe + r * (K / 2), se + r * G, ze ? ze + r * G : nullptr, K, G,
                              group, x.rows, x.n, xsum.data(), out + (r - r0), ldo);
  }
};

// int8 weights with one scale per row (weight-only int8): w[r][k] = q[r][k] * s[r]. Each 16
// values are widened to fp32 and multiplied there (vpmovsxbd, vcvtdq2ps, an FMA per token):
// exact products, the scale applied once per row.
using i8v = int8_t __attribute__((vector_size(L)));

inline f32v load_i8(const int8_t* p) {  // GCC's vector conversion of int8 goes value by value
#if defined(__AVX512F__)
  return (f32v)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#else
  i8v w;
  std::memcpy(&w, p, sizeof w);
  return __builtin_convertvector(__builtin_convertvector(w, i32v), f32v);
#endif
}

template <int NR, int NT>
inline void q8_block_dot(const int8_t* q, int64_t K, const float* s, const BF16* const* x,
                         float* out, int64_t ldo) {
  f32v acc[NR][NT] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    f32v xv[NT];
    for (int n = 0; n < NT; ++n) xv[n] = load(x[n] + k);
    for (int r = 0; r < NR; ++r) {
      read_ahead(q + r * K + k);
      const f32v wv = load_i8(q + r * K + k);
      for (int n = 0; n < NT; ++n) acc[r][n] += wv * xv[n];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NT; ++n) {
      float v = hsum(acc[r][n]);
      for (int64_t j = k; j < K; ++j) v += static_cast<float>(q[r * K + j]) * to_float(x[n][j]);
      out[n * ldo + r] = v * s[r];
    }
}

// Rows [r0, r1) of an int8 weight as bf16 [r1 - r0, K] (rows ldo apart), rounded to nearest
// even.
void q8_dequantize(const int8_t* q, const float* s, int64_t K, int64_t r0, int64_t r1, BF16* out,
                   int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    BF16* o = out + (r - r0) * ldo;
    int64_t k = 0;
    for (; k + L <= K; k += L) store<BF16>(o + k, rnd_v<BF16>(load_i8(q + r * K + k) * s[r]));
    for (; k < K; ++k) o[k] = static_cast<BF16>(static_cast<float>(q[r * K + k]) * s[r]);
  }
}

struct Q8 {  // q int8 [O, K], s fp32 [O]
  const int8_t* q;
  const float* s;
  int64_t O, K;
  int64_t row_bytes() const { return K + 4; }
  void dot(int64_t, int64_t r0, int64_t r1, const Tokens<BF16>& x, float* out,
           int64_t ldo) const {
    if (dequantize_first(x, Q8_DEQUANT_MIN_TOKENS)) {
      dequantized_dot(K, r0, r1, x, out, ldo,
                      [&](BF16* rows, int64_t ldw) { q8_dequantize(q, s, K, r0, r1, rows, ldw); });
      return;
    }
    for (int64_t r = r0; r < r1;) {
      const int nr = r + ROWS <= r1 ? ROWS : 1;
      for (int64_t n = 0; n < x.n;) {
        const int nt = n + 2 <= x.n ? 2 : 1;
        float* o = out + n * ldo + (r - r0);
        const int8_t* qr = q + r * K;
        if (nr == ROWS && nt == 2) q8_block_dot<ROWS, 2>(qr, K, s + r, x.rows + n, o, ldo);
        else if (nr == ROWS) q8_block_dot<ROWS, 1>(qr, K, s + r, x.rows + n, o, ldo);
        else if (nt == 2) q8_block_dot<1, 2>(qr, K, s + r, x.rows + n, o, ldo);
        else q8_block_dot<1, 1>(qr, K, s + r, x.rows + n, o, ldo);
        n += nt;
      }
      r += nr;
    }
  }
};

// out [N, O] = x [N, K] times the weight's rows, in W.
template <typename W, typename Weights>
at::Tensor linear_impl(const at::Tensor& x, const Weights& w) {
  const int64_t N = x.size(0), K = x.size(1), O = w.O;
  const at::Tensor xc = x.contiguous();
  std::vector<const W*> xp(N);
  for (int64_t n = 0; n < N; ++n) xp[n] = rows_of<W>(xc) + n * K;
  at::Tensor out = at::empty({N, O}, x.options());
  W* op = reinterpret_cast<W*>(out.data_ptr());
  const bool amx = use_amx<W>(K, N);
  std::vector<uint32_t> pairs;
  if (amx) pairs = pack_pairs<W>(xp.data(), N, K);
  const Tokens<W> tokens{xp.data(), N, amx ? pairs.data() : nullptr};
  const int64_t step = rows_per_task(O, w.row_bytes(), amx ? 2 * TILE : ROWS);
  const int64_t tasks = (O + step - 1) / step;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(N * step));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * step, r1 = std::min(O, r0 + step), nr = r1 - r0;
      w.dot(0, r0, r1, tokens, acc.data(), nr);
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
  const int64_t O = w.size(0), K = w.size(1);
  if (x.scalar_type() == at::kFloat)
    return linear_impl<float>(x, Dense<float>{rows_of<float>(w), O, K});
  return linear_impl<BF16>(x, Dense<BF16>{rows_of<BF16>(w), O, K});
}

// gate_up: E weights [2I, D] (gate rows, then up rows); down: E weights [D, I].
template <typename W, typename Weights>
at::Tensor moe_impl(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                    const Weights& gate_up, const Weights& down, int64_t E) {
  const int64_t T = x.size(0), D = x.size(1), k = ids.size(1);
  const int64_t I = down.K, P = T * k;
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


  // Where AMX applies, each used expert's tokens in pair layout, packed once for all its rows.
  const int64_t nused = static_cast<int64_t>(used.size());
  int64_t most = 0;  // tokens of the busiest expert
  for (int64_t e = 0; e < E; ++e) most = std::max(most, count[e + 1] - count[e]);
  auto tokens_of = [&](const std::vector<const W*>& rows, int64_t K) {
    std::vector<std::vector<uint32_t>> packs(E);
    if (!use_amx<W>(K, most)) return packs;  // no expert has tokens enough for tiles
    at::parallel_for(0, nused, 1, [&](int64_t a, int64_t b) {
      for (int64_t u = a; u < b; ++u) {
        const int64_t e = used[u], n = count[e + 1] - count[e];
        if (use_amx<W>(K, n)) packs[e] = pack_pairs<W>(rows.data() + count[e], n, K);
      }
    });
    return packs;
  };
  auto tokens_for = [&](const std::vector<const W*>& rows,
                        const std::vector<std::vector<uint32_t>>& packs, int64_t e) {
    return Tokens<W>{rows.data() + count[e], count[e + 1] - count[e],
                     packs[e].empty() ? nullptr : packs[e].data()};
  };

  // gate and up rows [i0, i1) of each used expert -> act [P, I] (rows in expert order).
  const bool amx_up = use_amx<W>(D, most), amx_down = use_amx<W>(I, most);
  const auto x_packs = tokens_of(xrow, D);
  std::vector<W> act(static_cast<size_t>(P * I));
  const int64_t istep = rows_per_task(I * nused, gate_up.row_bytes(),
                                      amx_up ? 2 * TILE : ROWS);
  const int64_t iblocks = (I + istep - 1) / istep;
  at::parallel_for(0, nused * iblocks, 1, [&](int64_t a, int64_t b) {
    std::vector<float> g, u;
    for (int64_t task = a; task < b; ++task) {
      const int64_t e = used[task / iblocks], i0 = (task % iblocks) * istep;
      const int64_t i1 = std::min(I, i0 + istep), n = count[e + 1] - count[e], nr = i1 - i0;
      const Tokens<W> xs = tokens_for(xrow, x_packs, e);
      g.assign(n * nr, 0.f);
      u.assign(n * nr, 0.f);
      gate_up.dot(e, i0, i1, xs, g.data(), nr);
      gate_up.dot(e, I + i0, I + i1, xs, u.data(), nr);
      for (int64_t j = 0; j < n; ++j) {
        const float *gj = g.data() + j * nr, *uj = u.data() + j * nr;
        W* aj = act.data() + (count[e] + j) * I + i0;
        int64_t r = 0;
        for (; r + L <= nr; r += L)
          store<W>(aj + r, rnd_v<W>(rnd_v<W>(silu_v(rnd_v<W>(load(gj + r)))) *
                                    rnd_v<W>(load(uj + r))));
        for (; r < nr; ++r)
          aj[r] = static_cast<W>(rnd<W>(silu(rnd<W>(gj[r]))) * rnd<W>(uj[r]));
      }
    }
  });

  // down rows [d0, d1) of each used expert -> y [P, D] (rows in expert order).
  std::vector<float> y(static_cast<size_t>(P * D));
  std::vector<const W*> arow(P);
  for (int64_t i = 0; i < P; ++i) arow[i] = act.data() + i * I;
  const auto act_packs = tokens_of(arow, I);
  const int64_t dstep = rows_per_task(D * nused, down.row_bytes(),
                                      amx_down ? 2 * TILE : ROWS);
  const int64_t dblocks = (D + dstep - 1) / dstep;
  at::parallel_for(0, nused * dblocks, 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t e = used[task / dblocks], d0 = (task % dblocks) * dstep;
      const int64_t d1 = std::min(D, d0 + dstep);
      down.dot(e, d0, d1, tokens_for(arow, act_packs, e), y.data() + count[e] * D + d0, D);
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
        int64_t d = 0;
        for (; d + L <= D; d += L) {
          const f32v term = rnd_v<W>(rnd_v<W>(load(yr + d)) * wt);
          const f32v v = j == 0 ? term : rnd_v<W>(load(o + d) + term);
          std::memcpy(o + d, &v, sizeof v);
        }
        for (; d < D; ++d) {
          const float term = rnd<W>(rnd<W>(yr[d]) * wt);
          o[d] = j == 0 ? term : rnd<W>(o[d] + term);
        }
      }
  });
  int64_t i = 0;  // the sums are rounded to W already
  for (; i + L <= T * D; i += L) store<W>(op + i, load(sum.data() + i));
  for (; i < T * D; ++i) op[i] = static_cast<W>(sum[i]);
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
  const int64_t E = gate_up.size(0), D = x.size(1), I = down.size(2);
  if (x.scalar_type() == at::kFloat)
    return moe_impl<float>(xc, ids, weights, Dense<float>{rows_of<float>(gate_up), 2 * I, D},
                           Dense<float>{rows_of<float>(down), D, I}, E);
  return moe_impl<BF16>(xc, ids, weights, Dense<BF16>{rows_of<BF16>(gate_up), 2 * I, D},
                        Dense<BF16>{rows_of<BF16>(down), D, I}, E);
}

// -- int4 entry points ------------------------------------------------------------------------

// An int4 weight's tensors as Q4, checked: q uint8 [..., O, K / 2], s and zs fp32 [..., O, G].
Q4 q4_of(const at::Tensor& q, const at::Tensor& s, const std::optional<at::Tensor>& zs,
         int64_t group, const char* what) {
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), what,
              ": q must be contiguous uint8 (two int4 values a byte), got ", q.scalar_type());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == q.dim() &&
                  s.size(-2) == q.size(-2),
              what, ": scales must be contiguous float32 [..., O, G] beside q ", q.sizes());
  const int64_t K = q.size(-1) * 2, G = s.size(-1);
  TORCH_CHECK(K % Q4_BLOCK == 0, what, ": in_features ", K, " is not a multiple of ", Q4_BLOCK);
  TORCH_CHECK(group > 0 && group % 32 == 0 && G * group == K, what, ": ", G,
              " groups of ", group, " over ", K, " in_features (groups are multiples of 32)");
  for (int64_t d = 0; d + 2 < q.dim(); ++d)
    TORCH_CHECK(q.size(d) == s.size(d), what, ": q ", q.sizes(), " and scales ", s.sizes());
  const float* zp = nullptr;
  if (zs.has_value() && zs->defined()) {
    TORCH_CHECK(zs->sizes() == s.sizes() && zs->scalar_type() == at::kFloat &&
                    zs->is_contiguous(),
                what, ": zero points (times scales) must be float32 like the scales");
    zp = zs->data_ptr<float>();
  }
  return Q4{q.data_ptr<uint8_t>(), s.data_ptr<float>(), zp, q.size(-2), K, G, group};
}

void check_bf16_rows(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, what, ": x [N, K] on CPU");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, what, ": x must be bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) == K, what, ": x has ", x.size(1), " features, the weight ", K);
}

// x bf16 [N, K] times an int4 weight [O, K] -> bf16 [N, O].
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                     const std::optional<at::Tensor>& zs, int64_t group) {
  TORCH_CHECK(q.dim() == 2, "q4_linear: q [O, K / 2]");
  const Q4 w = q4_of(q, s, zs, group, "q4_linear");
  check_bf16_rows(x, w.K, "q4_linear");
  return linear_impl<BF16>(x, w);
}

// x bf16 [N, K] times an int8 weight [O, K] with one scale per row -> bf16 [N, O].
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.dim() == 2 && q.device().is_cpu() && q.scalar_type() == at::kChar &&
                  q.is_contiguous(),
              "q8_linear: q must be contiguous int8 [O, K] on CPU, got ", q.scalar_type(), " ",
              q.sizes());
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                  s.dim() == 1 && s.size(0) == q.size(0),
              "q8_linear: scales must be contiguous float32 [O] for q ", q.sizes());
  check_bf16_rows(x, q.size(1), "q8_linear");
  return linear_impl<BF16>(x, Q8{q.data_ptr<int8_t>(), s.data_ptr<float>(), q.size(0),
                                 q.size(1)});
}

// moe() with int4 experts: gate_up q [E, 2I, D / 2], scales [E, 2I, D / group]; down q
// [E, D, I / 2], scales [E, D, I / down_group]; x bf16 [T, D] -> bf16 [T, D].
at::Tensor q4_moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                  const at::Tensor& gate_up_q, const at::Tensor& gate_up_s,
                  const std::optional<at::Tensor>& gate_up_zs, int64_t group,
                  const at::Tensor& down_q, const at::Tensor& down_s,
                  const std::optional<at::Tensor>& down_zs, int64_t down_group) {
  TORCH_CHECK(ids.dim() == 2 && weights.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "q4_moe: x [T, D], ids and weights [T, k]");
  TORCH_CHECK(gate_up_q.dim() == 3 && down_q.dim() == 3 && gate_up_q.size(0) == down_q.size(0),
              "q4_moe: gate_up [E, 2I, D / 2] and down [E, D, I / 2]");
  const Q4 gu = q4_of(gate_up_q, gate_up_s, gate_up_zs, group, "q4_moe gate_up");
  const Q4 dn = q4_of(down_q, down_s, down_zs, down_group, "q4_moe down");
  TORCH_CHECK(gu.O == 2 * dn.K && dn.O == gu.K, "q4_moe: gate_up [E, ", gu.O, ", ", gu.K,
              "] and down [E, ", dn.O, ", ", dn.K, "] do not fit");
  check_bf16_rows(x, gu.K, "q4_moe");
  return moe_impl<BF16>(x.contiguous(), ids, weights, gu, dn, gate_up_q.size(0));
}

// -- greedy sampling: the index of each row's largest value ----------------------------------------
// torch's max over a row of logits reads bf16 a value at a time, so greedy sampling converted
// the logits to fp32 first: at 8 x 152064 a copy and a max of ~1.5 ms each.

struct Best {
  float v;
  int64_t i;
};

// The first largest of x[i0, i1); a NaN counts above all (torch's max propagates NaN).
template <typename W>
Best first_max_span(const W* x, int64_t i0, int64_t i1) {
  Best b{-INFINITY, i0};
  bool nan = false;
  int64_t i = i0;
  if (i1 - i0 >= L) {
    f32v best = load(x + i0);
    i32v idx, at;
    for (int l = 0; l < L; ++l) idx[l] = l;
    at = idx + static_cast<int32_t>(L);
    i32v seen_nan = best != best;
    for (i = i0 + L; i + L <= i1; i += L, at += static_cast<int32_t>(L)) {
      const f32v v = load(x + i);
      const i32v gt = v > best;  // strict: a lane keeps its first largest
      best = gt ? v : best;
      idx = gt ? at : idx;
      seen_nan |= v != v;
    }
    for (int l = 0; l < L; ++l) {
      nan = nan || seen_nan[l];
      const int64_t li = i0 + idx[l];
      if (best[l] > b.v || (best[l] == b.v && li < b.i)) b = {best[l], li};
    }
  }
  for (; i < i1; ++i) {  // the tail comes after every lane's indices
    const float v = to_float(x[i]);
    nan = nan || std::isnan(v);
    if (v > b.v) b = {v, i};
  }
  if (nan)
    for (int64_t j = i0; j < i1; ++j)
      if (std::isnan(to_float(x[j]))) return {to_float(x[j]), j};
  return b;
}

template <typename W>
at::Tensor first_max_impl(const at::Tensor& x) {
  const int64_t B = x.size(0), V = x.size(1);
  const W* xp = reinterpret_cast<const W*>(x.data_ptr());
  // Spans of a row per task: the threads share a row when there are fewer rows than threads.
  const int64_t spans = std::max<int64_t>(
      1, std::min<int64_t>((2 * at::get_num_threads() + B - 1) / B, V / 8192));
  const int64_t span = (V + spans - 1) / spans;
  std::vector<Best> part(static_cast<size_t>(B * spans));
  at::parallel_for(0, B * spans, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / spans, i0 = (t % spans) * span;
      part[t] = first_max_span<W>(xp + row * V, i0, std::min(V, i0 + span));
    }
  });
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t row = 0; row < B; ++row) {
    Best b = part[row * spans];
    for (int64_t s = 1; s < spans && !std::isnan(b.v); ++s) {
      const Best c = part[row * spans + s];  // later spans win only by a larger value
      if (c.v > b.v || std::isnan(c.v)) b = c;
    }
    op[row] = b.i;
  }
  return out;
}

// x [B, V] -> int64 [B]: each row's first largest value's index (torch.max(x, -1).indices).
at::Tensor first_max(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "first_max: x [B, V] with V > 0");
  TORCH_CHECK(x.device().is_cpu(), "first_max: CPU tensors only");
  const at::Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) return first_max_impl<float>(xc);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "first_max: float32 or bfloat16 only, got ",
              x.scalar_type());
  return first_max_impl<c10::BFloat16>(xc);
}

}  // namespace

TORCH_LIBRARY(qomni_cpu, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("moe(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor");
  m.def("first_max(Tensor x) -> Tensor");
  m.def("q4_linear(Tensor x, Tensor q, Tensor s, Tensor? zs, int group) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("q4_moe(Tensor x, Tensor ids, Tensor weights, Tensor gate_up_q, Tensor gate_up_s, "
        "Tensor? gate_up_zs, int group, Tensor down_q, Tensor down_s, Tensor? down_zs, "
        "int down_group) -> Tensor");
}

TORCH_LIBRARY_IMPL(qomni_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
  m.impl("first_max", &first_max);
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("q4_moe", &q4_moe);
}
