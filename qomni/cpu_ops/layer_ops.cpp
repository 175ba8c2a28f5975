// The row-wise work between a decoder layer's matmuls, one call where torch runs many small
// ops: RMSNorm (8 ops), q/k's per-head RMSNorm followed by the rotary embedding (15 ops), the
// KV cache write (two index_puts and their indices), and a decode step's attention.
//
// Legend: N rows, D row length; B batch, S tokens, H heads (q's and k's together), Dh head dim;
// attention: Hkv key/value heads, G query heads per KV head, n cached keys.
//
// Why: at batch 1 each of torch's small ops costs 2-20 us of dispatch, allocation and a thread
// fork on 2 threads, next to ~1 ms of matmuls a layer in the int4 thinker; RMSNorm took ~20 us
// and q/k's norm and rotation ~60 us a layer (real widths, bf16, 2-core Zen 4), writing the
// step's keys and values ~25 us, and torch's flash attention ~130 us for one token's 32 query
// heads over 300 cached keys (its blocks are sized for many query rows).
//
// Numerics: as the reference's ops, in fp32, each result rounded to the activations' dtype where
// torch rounds it (the normalised row, its product with the weight, each product of the
// rotation and their sum). The one difference: the mean of squares sums in another order.
// Products and sums are never fused into one rounding (fp-contract off below): torch runs them
// as separate ops, so in fp32 the rotation is bit-exact.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "vec.h"

#pragma GCC optimize("fp-contract=off")

namespace {

using namespace qomni::vec;

constexpr int64_t MAX_HEAD_DIM = 1024;  // a head's normalised row sits on the stack
constexpr int64_t ROWS_PER_TASK = 64;   // below this, one thread (a fork costs more)

// 1 / sqrt(mean(x^2) + eps) of a row, as x.float().pow(2).mean(-1) + eps, then rsqrt.
template <typename T>
float inv_rms(const T* x, int64_t D, float eps) {
  f32v a0{}, a1{};
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const f32v v0 = load(x + d), v1 = load(x + d + L);
    a0 += v0 * v0;
    a1 += v1 * v1;
  }
  for (; d + L <= D; d += L) {
    const f32v v = load(x + d);
    a0 += v * v;
  }
  float s = hsum(a0 + a1);
  for (; d < D; ++d) s += to_float(x[d]) * to_float(x[d]);
  return 1.f / std::sqrt(s / static_cast<float>(D) + eps);
}

// y[d] = w[d] * rnd(x[d] * r) for d < D, kept in fp32 lanes (already rounded to T).
template <typename T>
void norm_row(const T* x, const T* w, int64_t D, float eps, float* y) {
  const float r = inv_rms(x, D, eps);
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const f32v v = rnd_v<T>(rnd_v<T>(load(x + d) * r) * load(w + d));
    std::memcpy(y + d, &v, sizeof v);
  }
  for (; d < D; ++d) y[d] = rnd<T>(rnd<T>(to_float(x[d]) * r) * to_float(w[d]));
}

template <typename T>
void store_row(const float* y, int64_t D, T* out) {
  int64_t d = 0;
  for (; d + L <= D; d += L) store(out + d, load(y + d));
  for (; d < D; ++d) out[d] = static_cast<T>(y[d]);
}

template <typename T>
at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t D = x.size(-1), N = x.numel() / D;
  at::Tensor out = at::empty_like(x);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, N, ROWS_PER_TASK, [&](int64_t n0, int64_t n1) {
    std::vector<float> y(static_cast<size_t>(D));
    for (int64_t n = n0; n < n1; ++n) {
      norm_row<T>(xp + n * D, wp, D, static_cast<float>(eps), y.data());
      store_row<T>(y.data(), D, op + n * D);
    }
  });
  return out;
}

// x [..., D] contiguous, w [D] of x's dtype -> w * (x * rsqrt(mean(x^2) + eps)), computed as
// qomni.models.layers.rms_norm.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "rms_norm: x [..., D] contiguous");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous(),
              "rms_norm: w [D] for x [..., D], got ", w.sizes(), " for ", x.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rms_norm: w and x of one dtype");
  if (x.scalar_type() == at::kFloat) return rms_norm_impl<float>(x, w, eps);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm: float32 or bfloat16 only, got ",
              x.scalar_type());
  return rms_norm_impl<c10::BFloat16>(x, w, eps);
}

template <typename T>
at::Tensor norm_rope_impl(const at::Tensor& x, const std::optional<at::Tensor>& w, double eps,
                          const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), Dh = x.size(3), half = Dh / 2;
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : S * Dh;  // cos, sin shared by the rows when B is 1
  at::Tensor out = at::empty({B, H, S, Dh}, x.options());
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w ? w->const_data_ptr<T>() : nullptr;
  const T* cp = cos.const_data_ptr<T>();
  const T* snp = sin.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * S * H, ROWS_PER_TASK, [&](int64_t i0, int64_t i1) {
    float y[MAX_HEAD_DIM];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (S * H), s = i / H % S, h = i % H;
      const T* row = xp + b * sb + s * ss + h * sh;
      if (wp) {
        norm_row<T>(row, wp + h * Dh, Dh, static_cast<float>(eps), y);
      } else {
        for (int64_t d = 0; d < Dh; ++d) y[d] = to_float(row[d]);
      }
      // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each op rounded to T
      const T* c = cp + b * cb + s * Dh;
      const T* sn = snp + b * cb + s * Dh;
      T* o = op + ((b * H + h) * S + s) * Dh;
      if (half % L == 0) {
        for (int64_t d = 0; d < Dh; d += L) {
          const f32v rot = d < half ? -load(y + d + half) : load(y + d - half);
          const f32v a = rnd_v<T>(load(y + d) * load(c + d));
          store(o + d, rnd_v<T>(a + rnd_v<T>(rot * load(sn + d))));
        }
      } else {
        for (int64_t d = 0; d < Dh; ++d) {
          const float rot = d < half ? -y[d + half] : y[d - half];
          const float a = rnd<T>(y[d] * to_float(c[d]));
          o[d] = static_cast<T>(a + rnd<T>(rot * to_float(sn[d])));
        }
      }
    }
  });
  return out;
}

// x [B, S, H, Dh] (each head's Dh values contiguous, any other strides), w [H, Dh] or None,
// cos, sin [B or 1, S, Dh] contiguous, all of one dtype -> [B, H, S, Dh]: each head's row
// RMS-normed by its row of w (when given), then rotated, as
// apply_rope(rms_norm(x, w, eps).transpose(1, 2), cos, sin).
at::Tensor norm_rope(const at::Tensor& x, const std::optional<at::Tensor>& w, double eps,
                     const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu(), "norm_rope: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "norm_rope: x [B, S, H, Dh], Dh contiguous");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), Dh = x.size(3);
  TORCH_CHECK(Dh % 2 == 0 && Dh <= MAX_HEAD_DIM, "norm_rope: even Dh <= ", MAX_HEAD_DIM);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == S &&
                    t->size(2) == Dh && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                "norm_rope: cos, sin [B or 1, S, Dh] contiguous, of x's dtype; got ", t->sizes());
  if (w)
    TORCH_CHECK(w->dim() == 2 && w->size(0) == H && w->size(1) == Dh && w->is_contiguous() &&
                    w->scalar_type() == x.scalar_type(),
                "norm_rope: w [H, Dh] contiguous, of x's dtype; got ", w->sizes());
  if (x.scalar_type() == at::kFloat) return norm_rope_impl<float>(x, w, eps, cos, sin);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "norm_rope: float32 or bfloat16 only, got ",
              x.scalar_type());
  return norm_rope_impl<c10::BFloat16>(x, w, eps, cos, sin);
}

// keys[rows[b], h, slots[b, s]] = k[b, s, h] and the same for values, for b < B, s < S,
// h < Hkv: keys, values [R, Hkv, M, Dh] (a layer's cache, contiguous), rows [B] and slots [B, S]
// int64, k, v [B, S, Hkv, Dh] of the cache's dtype (each head's Dh values contiguous).
void kv_write(at::Tensor& keys, at::Tensor& values, const at::Tensor& rows,
              const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(keys.device().is_cpu() && k.device().is_cpu(), "kv_write: CPU tensors only");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.sizes() == keys.sizes() &&
                  values.is_contiguous() && values.scalar_type() == keys.scalar_type(),
              "kv_write: keys and values [R, Hkv, M, Dh], contiguous, of one dtype");
  const int64_t R = keys.size(0), Hkv = keys.size(1), M = keys.size(2), Dh = keys.size(3);
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(2) == Hkv && k.size(3) == Dh &&
                  k.stride(3) == 1 && v.stride(3) == 1,
              "kv_write: k and v [B, S, ", Hkv, ", ", Dh, "] with Dh contiguous, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == keys.scalar_type() && v.scalar_type() == keys.scalar_type(),
              "kv_write: k and v of the cache's dtype ", keys.scalar_type());
  const int64_t B = k.size(0), S = k.size(1);
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == B && rows.scalar_type() == at::kLong,
              "kv_write: rows int64 [", B, "]");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && slots.size(1) == S &&
                  slots.scalar_type() == at::kLong,
              "kv_write: slots int64 [", B, ", ", S, "]");
  const at::Tensor rc = rows.contiguous(), sc = slots.contiguous();
  const int64_t* rp = rc.const_data_ptr<int64_t>();
  const int64_t* sp = sc.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < R, "kv_write: row ", rp[b], " outside the cache's ", R);
    for (int64_t s = 0; s < S; ++s)
      TORCH_CHECK(sp[b * S + s] >= 0 && sp[b * S + s] < M, "kv_write: slot ", sp[b * S + s],
                  " outside the cache's ", M);
  }
  const int64_t item = keys.element_size(), row_bytes = Dh * item;
  char* kd = static_cast<char*>(keys.data_ptr());
  char* vd = static_cast<char*>(values.data_ptr());
  const char* ks = static_cast<const char*>(k.const_data_ptr());
  const char* vs = static_cast<const char*>(v.const_data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t to = ((rp[b] * Hkv + h) * M + sp[b * S + s]) * row_bytes;
        std::memcpy(kd + to, ks + (b * k.stride(0) + s * k.stride(1) + h * k.stride(2)) * item,
                    row_bytes);
        std::memcpy(vd + to, vs + (b * v.stride(0) + s * v.stride(1) + h * v.stride(2)) * item,
                    row_bytes);
      }
}

// One KV head's attention for its G query rows (one token): q [G, Dh] (rows ldq apart), keys and
// values [n, Dh] (rows ldk apart), visible [n] -> out [G, Dh]. As torch's CPU flash attention
// computes it: scores and their softmax in fp32, the unnormalised exponentials rounded to T for
// the product with the values (fp32 sums), divided by their fp32 sum at the end. Products may
// fuse with their sums here (a dot product's order is not torch's anyway).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
constexpr int64_t ATT_ROWS = 4;   // query rows a key is read for at once
constexpr int64_t ATT_DIMS = 2 * L;  // values' dims per pass of the keys (2 x 8 sums in registers)

template <typename T>
void attend(const T* q, int64_t ldq, const T* k, const T* v, int64_t ldk, const bool* visible,
            int64_t n, int64_t G, int64_t Dh, float scale, float* scores, T* out) {
  const bool whole = Dh % L == 0;
  std::vector<float> qf(static_cast<size_t>(G * Dh));  // q in fp32 once, not at every key
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < Dh; ++d) qf[g * Dh + d] = to_float(q[g * ldq + d]);
  for (int64_t g0 = 0; g0 < G; g0 += ATT_ROWS) {  // scores [G, n]
    const int64_t rows = std::min(ATT_ROWS, G - g0);
    for (int64_t j = 0; j < n; ++j) {
      const T* kj = k + j * ldk;
      float dot[ATT_ROWS] = {};
      if (whole && rows == ATT_ROWS) {
        f32v acc[ATT_ROWS] = {};
        for (int64_t d = 0; d < Dh; d += L) {
          const f32v kv = load(kj + d);
          for (int64_t r = 0; r < ATT_ROWS; ++r) acc[r] += load(&qf[(g0 + r) * Dh + d]) * kv;
        }
        for (int64_t r = 0; r < ATT_ROWS; ++r) dot[r] = hsum(acc[r]);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < Dh; ++d) dot[r] += qf[(g0 + r) * Dh + d] * to_float(kj[d]);
      }
      for (int64_t r = 0; r < rows; ++r)
        scores[(g0 + r) * n + j] = visible[j] ? dot[r] * scale : -INFINITY;
    }
  }
  std::vector<float> sums(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {  // exponentials, rounded to T; masked keys exactly 0
    float* sg = scores + g * n;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) top = std::max(top, sg[j]);
    float sum = 0.f;
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      const f32v x = load(sg + j);
      const f32v e = x == -INFINITY ? f32v{} : exp_v(x - top);
      sum += hsum(e);
      const f32v r = rnd_v<T>(e);
      std::memcpy(sg + j, &r, sizeof r);
    }
    for (; j < n; ++j) {
      const float e = sg[j] == -INFINITY ? 0.f : std::exp(sg[j] - top);
      sum += e;
      sg[j] = rnd<T>(e);
    }
    sums[g] = sum;
  }
  for (int64_t g0 = 0; g0 < G; g0 += ATT_ROWS) {  // out = exponentials x values / sum
    const int64_t rows = std::min(ATT_ROWS, G - g0);
    if (whole && rows == ATT_ROWS && Dh % ATT_DIMS == 0) {
      for (int64_t d = 0; d < Dh; d += ATT_DIMS) {
        f32v acc[ATT_ROWS][2] = {};
        for (int64_t j = 0; j < n; ++j) {
          if (!visible[j]) continue;  // 0, and a hidden slot's value is never read
          const f32v v0 = load(v + j * ldk + d), v1 = load(v + j * ldk + d + L);
          for (int64_t r = 0; r < ATT_ROWS; ++r) {
            const float pj = scores[(g0 + r) * n + j];
            acc[r][0] += pj * v0;
            acc[r][1] += pj * v1;
          }
        }
        for (int64_t r = 0; r < ATT_ROWS; ++r)
          for (int h = 0; h < 2; ++h)
            store(out + (g0 + r) * Dh + d + h * L, rnd_v<T>(acc[r][h] / sums[g0 + r]));
      }
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = g0 + r;
      for (int64_t d = 0; d < Dh; ++d) {
        float acc = 0.f;
        for (int64_t j = 0; j < n; ++j)
          if (visible[j]) acc += scores[g * n + j] * to_float(v[j * ldk + d]);
        out[g * Dh + d] = static_cast<T>(acc / sums[g]);
      }
    }
  }
}
#pragma GCC pop_options

template <typename T>
at::Tensor decode_attention_impl(const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& visible,
                                 double scale) {
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), Dh = q.size(3), n = keys.size(2);
  at::Tensor out = at::empty({B, Hkv, G, Dh}, q.options());
  const at::Tensor vis = visible.reshape({visible.size(0), n}).contiguous();
  const int64_t mb = visible.size(0) == 1 ? 0 : n;  // one mask for every row
  const T* qp = q.const_data_ptr<T>();
  const T* kp = keys.const_data_ptr<T>();
  const T* vp = values.const_data_ptr<T>();
  const bool* mp = vis.const_data_ptr<bool>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(static_cast<size_t>(G * n));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv;
      attend<T>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                kp + b * keys.stride(0) + h * keys.stride(1),
                vp + b * values.stride(0) + h * values.stride(1), keys.stride(2), mp + b * mb, n,
                G, Dh, static_cast<float>(scale), scores.data(), op + t * G * Dh);
    }
  });
  return out;
}

// A decode step's attention, each KV head's G query heads as its query rows: q [B, Hkv, G, Dh],
// keys and values [B, Hkv, n, Dh] (each key's Dh values contiguous, keys and values strided
// alike: views of a KV cache), visible bool [B or 1, 1, 1, n] -> [B, Hkv, G, Dh]; as
// F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& visible, double scale) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1,
              "decode_attention: q [B, Hkv, G, Dh], Dh contiguous");
  const int64_t B = q.size(0), Hkv = q.size(1), Dh = q.size(3);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == B && keys.size(1) == Hkv && keys.size(3) == Dh &&
                  keys.size(2) > 0 && keys.stride(3) == 1 && values.sizes() == keys.sizes() &&
                  values.strides() == keys.strides(),
              "decode_attention: keys and values [", B, ", ", Hkv, ", n > 0, ", Dh,
              "], strided alike, got ", keys.sizes(), " and ", values.sizes());
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "decode_attention: q, keys and values of one dtype");
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.dim() == 4 &&
                  (visible.size(0) == B || visible.size(0) == 1) && visible.size(1) == 1 &&
                  visible.size(2) == 1 && visible.size(3) == keys.size(2),
              "decode_attention: visible bool [B or 1, 1, 1, n], got ", visible.sizes());
  if (q.scalar_type() == at::kFloat)
    return decode_attention_impl<float>(q, keys, values, visible, scale);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode_attention: float32 or bfloat16 only, got ",
              q.scalar_type());
  return decode_attention_impl<c10::BFloat16>(q, keys, values, visible, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qomni_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("norm_rope(Tensor x, Tensor? w, float eps, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor visible, float scale) "
        "-> Tensor");
  m.def("kv_write(Tensor(a!) keys, Tensor(b!) values, Tensor rows, Tensor slots, Tensor k, "
        "Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(qomni_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("norm_rope", &norm_rope);
  m.impl("kv_write", &kv_write);
  m.impl("decode_attention", &decode_attention);
}
