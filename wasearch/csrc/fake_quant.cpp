// Fused CPU kernels of wasearch's symmetric fake quantizer and of the Winograd layer's tiling
// (wasearch/cpu_kernels.py builds this file on first use; wasearch/quant.py and
// wasearch/winograd.py call it).
//
// Each kernel is one pass over memory that the torch chain in quant.py makes in three to eight
// (divide, abs, compare, convert, round, clamp, convert, multiply), and computes the same values
// bit for bit: the same IEEE operations in the same order (x / s, round half to even, clamp,
// r * s; the clip mask |x / s| < top + 1/2; the gradient mask * g, a float product, so that a
// clipped negative gradient gives -0.0 as the torch chain does). Build flags never include
// -ffast-math, which would turn the division into a reciprocal multiply.
//
// Layout: x is contiguous float32 with `rows` scales, one per slice of numel / rows consecutive
// elements (one scale: per tensor; rows = size of dim 0: per tap / per channel along dim 0).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 32768;  // torch's own grain for elementwise kernels

// fn(begin, end, scale) over [0, n) in parallel chunks that never cross a row.
template <typename Fn>
void for_rows(int64_t n, int64_t inner, const float* scale, const Fn& fn) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / inner;
      const int64_t stop = std::min(end, (row + 1) * inner);
      fn(i, stop, scale[row]);
      i = stop;
    }
  });
}

template <typename L>
void quantize_span(const float* __restrict x, float* __restrict y, int8_t* __restrict mask,
                   L* __restrict levels, int64_t begin, int64_t end, float s, float top) {
  const float lim = top + 0.5f;
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const float t = x[j] / s;
    const float r = std::min(std::max(std::nearbyint(t), -top), top);
    if (mask) mask[j] = std::fabs(t) < lim ? 1 : 0;
    if (levels) levels[j] = static_cast<L>(r);
    if (y) y[j] = r * s;
  }
}

// o[k] += sum_i w[i] * src[i * stride + k] for k < len, i < count, in order of increasing i;
// zero weights are skipped (the Cook-Toom transforms are sparse). One row of a small matrix
// applied to `count` vectors of `len` contiguous values (channels).
void add_weighted(float* __restrict o, int64_t len, const float* w, int64_t count,
                  const float* src, int64_t stride) {
  for (int64_t i = 0; i < count; ++i) {
    const float wi = w[i];
    if (wi == 0.0f) continue;
    const float* __restrict s = src + i * stride;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) o[k] += wi * s[k];
  }
}

void check_layout(const at::Tensor& x, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && scale.numel() >= 1 && x.numel() % scale.numel() == 0,
              "scale must be contiguous float32 with a count of elements that divides x's");
}

}  // namespace

// (values or undefined, mask (int8 0/1) or undefined, levels (int8 / int16) or undefined)
std::vector<at::Tensor> quantize(const at::Tensor& x, const at::Tensor& scale, int64_t top,
                                 bool values, bool mask, int64_t level_bytes) {
  check_layout(x, scale);
  TORCH_CHECK(level_bytes == 0 || level_bytes == 1 || level_bytes == 2, "level_bytes: 0, 1, 2");
  const int64_t n = x.numel();
  const int64_t inner = std::max<int64_t>(n / scale.numel(), 1);
  at::Tensor y = values ? at::empty_like(x) : at::Tensor();
  at::Tensor m = mask ? at::empty(x.sizes(), x.options().dtype(at::kChar)) : at::Tensor();
  at::Tensor lev;
  if (level_bytes == 1) lev = at::empty(x.sizes(), x.options().dtype(at::kChar));
  if (level_bytes == 2) lev = at::empty(x.sizes(), x.options().dtype(at::kShort));
  const float* px = x.data_ptr<float>();
  float* py = values ? y.data_ptr<float>() : nullptr;
  int8_t* pm = mask ? m.data_ptr<int8_t>() : nullptr;
  const float ftop = static_cast<float>(top);
  if (level_bytes == 2) {
    int16_t* pl = lev.data_ptr<int16_t>();
    for_rows(n, inner, scale.data_ptr<float>(), [&](int64_t b, int64_t e, float s) {
      quantize_span<int16_t>(px, py, pm, pl, b, e, s, ftop);
    });
  } else {
    int8_t* pl = level_bytes == 1 ? lev.data_ptr<int8_t>() : nullptr;
    for_rows(n, inner, scale.data_ptr<float>(), [&](int64_t b, int64_t e, float s) {
      quantize_span<int8_t>(px, py, pm, pl, b, e, s, ftop);
    });
  }
  return {y, m, lev};
}

// mask * grad as float products (the straight-through gradient of a clipping quantizer).
at::Tensor masked_grad(const at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "grad must be a contiguous float32 CPU tensor");
  TORCH_CHECK(mask.scalar_type() == at::kChar && mask.is_contiguous() &&
                  mask.numel() == grad.numel(),
              "mask must be a contiguous int8 tensor the size of grad");
  at::Tensor out = at::empty_like(grad);
  const float* pg = grad.data_ptr<float>();
  const int8_t* pm = mask.data_ptr<int8_t>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) po[j] = static_cast<float>(pm[j]) * pg[j];
  });
  return out;
}

// levels * scale: a fake-quantized tensor rebuilt from its integer levels.
at::Tensor rebuild(const at::Tensor& levels, const at::Tensor& scale) {
  TORCH_CHECK(levels.device().is_cpu() && levels.is_contiguous() &&
                  (levels.scalar_type() == at::kChar || levels.scalar_type() == at::kShort),
              "levels must be a contiguous int8 or int16 CPU tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() >= 1 && levels.numel() % scale.numel() == 0,
              "scale must be contiguous float32 with a count of elements that divides levels'");
  at::Tensor out = at::empty(levels.sizes(), levels.options().dtype(at::kFloat));
  const int64_t n = levels.numel();
  const int64_t inner = std::max<int64_t>(n / scale.numel(), 1);
  float* po = out.data_ptr<float>();
  if (levels.scalar_type() == at::kChar) {
    const int8_t* pl = levels.data_ptr<int8_t>();
    for_rows(n, inner, scale.data_ptr<float>(), [&](int64_t b, int64_t e, float s) {
#pragma omp simd
      for (int64_t j = b; j < e; ++j) po[j] = static_cast<float>(pl[j]) * s;
    });
  } else {
    const int16_t* pl = levels.data_ptr<int16_t>();
    for_rows(n, inner, scale.data_ptr<float>(), [&](int64_t b, int64_t e, float s) {
#pragma omp simd
      for (int64_t j = b; j < e; ++j) po[j] = static_cast<float>(pl[j]) * s;
    });
  }
  return out;
}

// The input tiles of Winograd F(m x m, 3 x 3): every alpha x alpha window, stride m, of x
// zero-padded by 1 (and bottom/right up to whole tiles), laid out position-major as
// (alpha^2, C, N, th * tw): what F.unfold and a permuted copy make, in one pass.
at::Tensor gather_tiles(const at::Tensor& x, int64_t a, int64_t m, int64_t th, int64_t tw) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.dim() == 4,
              "x must be a contiguous 4-D float32 CPU tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), T = th * tw;
  at::Tensor out = at::empty({a * a, C, N, T}, x.options());
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(a * a * T, 1));
  at::parallel_for(0, C * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p / N, n = p % N;
      const float* src = px + (n * C + c) * H * W;
      for (int64_t i = 0; i < a; ++i) {
        for (int64_t j = 0; j < a; ++j) {
          float* dst = po + (((i * a + j) * C + c) * N + n) * T;
          for (int64_t ti = 0; ti < th; ++ti) {
            const int64_t r = ti * m + i - 1;
            float* d = dst + ti * tw;
            if (r < 0 || r >= H) {
              std::fill(d, d + tw, 0.0f);
              continue;
            }
            const float* row = src + r * W;
            for (int64_t tj = 0; tj < tw; ++tj) {
              const int64_t q = tj * m + j - 1;
              d[tj] = (q >= 0 && q < W) ? row[q] : 0.0f;
            }
          }
        }
      }
    }
  });
  return out;
}

// The gradient of gather_tiles: each tile value added back to its pixel, in the order of
// increasing tile position, from zero, as F.fold (col2im) adds them.
at::Tensor scatter_tiles(const at::Tensor& g, int64_t N, int64_t C, int64_t H, int64_t W,
                         int64_t a, int64_t m, int64_t th, int64_t tw) {
  const int64_t T = th * tw;
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.is_contiguous() &&
                  g.numel() == a * a * C * N * T,
              "g must be a contiguous float32 CPU tensor of (alpha^2, C, N, tiles) values");
  at::Tensor out = at::empty({N, C, H, W}, g.options());
  const float* pg = g.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(a * a * T, 1));
  at::parallel_for(0, C * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p / N, n = p % N;
      float* dst = po + (n * C + c) * H * W;
      std::fill(dst, dst + H * W, 0.0f);
      for (int64_t i = 0; i < a; ++i) {
        for (int64_t j = 0; j < a; ++j) {
          const float* src = pg + (((i * a + j) * C + c) * N + n) * T;
          for (int64_t ti = 0; ti < th; ++ti) {
            const int64_t r = ti * m + i - 1;
            if (r < 0 || r >= H) continue;
            float* row = dst + r * W;
            const float* s = src + ti * tw;
            for (int64_t tj = 0; tj < tw; ++tj) {
              const int64_t q = tj * m + j - 1;
              if (q >= 0 && q < W) row[q] += s[tj];
            }
          }
        }
      }
    }
  });
  return out;
}

namespace {

// B^T d B of one input tile, read straight from x (N, H, W, C) with the conv's zero padding of
// 1 (and bottom/right up to whole tiles): v[p * a + q][c] = sum_i sum_j B[p][i] d[i][j] B[q][j],
// position (p, q) at v + (p * a + q) * pos_stride. d and rows: scratch of a * a * C floats.
void input_tile(const float* px, const float* B, int64_t H, int64_t W, int64_t C, int64_t a,
                int64_t m, int64_t n, int64_t ti, int64_t tj, float* d, float* rows, float* v,
                int64_t pos_stride) {
  for (int64_t i = 0; i < a; ++i) {
    const int64_t r = ti * m + i - 1;
    for (int64_t j = 0; j < a; ++j) {
      const int64_t q = tj * m + j - 1;
      float* dst = d + (i * a + j) * C;
      if (r < 0 || r >= H || q < 0 || q >= W) {
        std::fill(dst, dst + C, 0.0f);
      } else {
        std::copy_n(px + ((n * H + r) * W + q) * C, C, dst);
      }
    }
  }
  // rows[p][j] = sum_i B[p][i] d[i][j], then v[p][q] = sum_j B[q][j] rows[p][j]
  for (int64_t p = 0; p < a; ++p) {
    for (int64_t j = 0; j < a; ++j) {
      float* o = rows + (p * a + j) * C;
      std::fill(o, o + C, 0.0f);
      add_weighted(o, C, B + p * a, a, d + j * C, a * C);
    }
    for (int64_t q = 0; q < a; ++q) {
      float* o = v + (p * a + q) * pos_stride;
      std::fill(o, o + C, 0.0f);
      add_weighted(o, C, B + q * a, a, rows + p * a * C, C);
    }
  }
}

// Position-major rows of kLargeRows bytes and more are written past the caches (whole 64-byte
// lines, non-temporal): the rows lie count floats apart, often a power of two, so that every
// row's line of a block falls into one cache set, and alpha^2 of them (36 at F4) evict each
// other before the block is done; written through the caches, each line was also read first.
// Measured on Zen 5 at F4, batch 32: a 32-channel 32x32 layer's A^T backward 3.6 -> 1.1 ms, a
// 64-channel 16x16 layer's B^T forward 2.3 -> 0.8 ms. (A consumer then reads the rows from
// memory, where rows this large would have been anyway.) Every thread that stores so fences
// (stream_fence) before its part of the parallel loop ends: non-temporal stores are weakly
// ordered, and the join alone does not promise the other threads see them.
constexpr int64_t kLargeRows = int64_t{2} << 20;

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Which of a row-major matrix's first `count` entries (at most 64) are nonzero: bit e for
// entry e (of an r x c matrix, entry (i, j) at bit i * c + j).
uint64_t nonzero_pattern(const float* M, int64_t count) {
  uint64_t bits = 0;
  for (int64_t e = 0; e < count && e < 64; ++e)
    if (M[e] != 0.0f) bits |= uint64_t{1} << e;
  return bits;
}

// inv_scale (or pos_scale): one float32 per tile position, contiguous.
void check_position_scales(const at::Tensor& s, int64_t a2, const char* name) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == a2, name,
              " must be alpha^2 contiguous float32 values");
}

// The nonzero patterns of the Cook-Toom B^T that wasearch.winograd.transform_matrices builds for
// F2, F4 and F6 (alpha 4, 6, 8; row p, column i at bit p * alpha + i): a transform with this
// pattern (every static layer) runs the multiply-adds of its nonzero entries only, the test
// of each entry compiled away; a transform with no zero (a learned, flex one) runs all of them
// without tests; any other pattern tests each entry as it goes (input_tile_pattern).
constexpr uint64_t pattern_rows(std::initializer_list<uint64_t> rows, int a) {
  uint64_t bits = 0;
  int p = 0;
  for (uint64_t r : rows) bits |= r << (p++ * a);
  return bits;
}
// each row's literal lists columns 0, 1, ... from its lowest bit
constexpr uint64_t kCookToomB4 = pattern_rows({0b0101, 0b0110, 0b0110, 0b1010}, 4);
constexpr uint64_t kCookToomB6 =
    pattern_rows({0b010101, 0b011110, 0b011110, 0b011110, 0b011110, 0b101010}, 6);
constexpr uint64_t kCookToomB8 = pattern_rows(
    {0b01010101, 0b01111110, 0b01111110, 0b01111110, 0b01111110, 0b01111110, 0b01111110,
     0b10101010},
    8);
constexpr uint64_t kDense4 = (uint64_t{1} << 16) - 1, kDense6 = (uint64_t{1} << 36) - 1;
constexpr uint64_t kDense8 = ~uint64_t{0};

// Where the input is larger than this, input_tile_v prefetches the next tile's pixels: a
// layer's input at batch 1 is in cache (its loads hit), where at batch 32 (8 MiB at 64 channels
// and 32 x 32) the gather waited on memory for most of its time.
constexpr int64_t kPrefetchFromBytes = 1 << 20;
inline bool worth_prefetching(const at::Tensor& x) {
  return static_cast<int64_t>(x.nbytes()) > kPrefetchFromBytes;
}

#if defined(__AVX512F__)
// The lanes of a 16-float vector that hold channels: all, or the first `left` (1..15) of the last.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// tail_mask, or no lanes where none are left (left <= 0).
inline __mmask16 lanes_left(int64_t left) { return left <= 0 ? 0 : tail_mask(left); }

// input_tile with 16 channels at a time in vector registers, alpha = A known at compile time:
// each column of the tile loaded once (zeros where it lies in the padding), B applied along it
// into rows[p][j], then along the rows, every product a fused multiply-add (the generic form
// passes each partial sum through memory, a load and a store per multiply-add: 2-3x slower).
// Mask: B's nonzero pattern when known at compile time (nonzero_pattern; with the inner loops
// unrolled, every test of an entry folds away), 0 to test each entry at run time; either way
// the nonzero entries' products are added in the same order: the forms agree bit for bit.
// Q8: out is uint8, each position quantized as winograd_input_q8 says (round half to even,
// zero point, clamp); else float. Position (p, q) at out + (p * A + q) * pos_stride.
// Position pos of one tile, 16 channels: stored as float, or quantized as winograd_input_q8
// says (round half to even, zero point, clamp) and stored as uint8.
template <bool Q8>
inline void store_position(__m512 acc, int64_t pos, void* out, int64_t pos_stride, int64_t c0,
                           __mmask16 mask, const float* inv, float zp) {
  if constexpr (Q8) {
    __m512 y = _mm512_roundscale_ps(_mm512_mul_ps(acc, _mm512_set1_ps(inv[pos])),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, _mm512_set1_ps(zp)), _mm512_setzero_ps()),
                      _mm512_set1_ps(255.0f));
    _mm_mask_storeu_epi8(static_cast<uint8_t*>(out) + pos * pos_stride + c0, mask,
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y)));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + pos * pos_stride + c0, mask, acc);
  }
}

// The pixels of the tile after (ti, tj) in the order the callers run them (tj + 1 in this row,
// else the first of the next row, within image n) that tile (ti, tj) does not read: rows
// r0 .. r0 + A - 1 and columns q0 .. q1 - 1, clipped to the image.
struct NextPixels {
  int64_t r0, q0, q1;
};
template <int A>
inline NextPixels next_tile_pixels(int64_t W, int64_t m, int64_t ti, int64_t tj) {
  if ((tj + 1) * m < W) {
    const int64_t q0 = tj * m + A - 1;
    return {ti * m - 1, q0, std::min<int64_t>(W, q0 + m)};
  }
  return {(ti + 1) * m - 1, 0, std::min<int64_t>(W, A - 1)};
}

template <int A, bool Q8, uint64_t Mask>
void input_tile_v(const float* px, const float* B, int64_t H, int64_t W, int64_t C, int64_t m,
                  int64_t n, int64_t ti, int64_t tj, void* out, int64_t pos_stride,
                  const float* inv, float zp, bool prefetch) {
  if constexpr (Mask != 0) {
    // The pattern known: the tile's 16 channels copied to a buffer (zeros in the padding),
    // then one row p of B d at a time from the buffer (A sums live, not A^2: the column-first
    // order below spilled its A^2 sums once the tests were gone, and ran slower than with
    // them at F4), and that row's A positions from it; the loop over rows stays a loop (all
    // of it unrolled, the buffer's loads were shared across rows, and spilled). The same
    // products added in the same order as below.
    // With prefetch, each block of 16 channels first asks for the same block of the next
    // tile's new pixels (one cache line each): at batch 32, 1 thread, Zen 5, the 8-bit layer
    // 64 -> 64 at 32 x 32 ran in 0.62x the time, 128 -> 128 at 16 x 16 0.72x, 256 -> 256 at
    // 8 x 8 0.87x (float32: 0.87x, 1.00x, 1.02x); one tile ahead did better than two.
    alignas(64) float dbuf[A * A * 16];
    const NextPixels next = next_tile_pixels<A>(W, m, ti, tj);
    const int64_t pq1 = prefetch ? next.q1 : next.q0;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __mmask16 mask = tail_mask(C - c0);
      for (int i = 0; i < A && pq1 > next.q0; ++i) {
        const int64_t r = next.r0 + i;
        if (r < 0 || r >= H) continue;
        for (int64_t q = next.q0; q < pq1; ++q)
          _mm_prefetch(reinterpret_cast<const char*>(px + ((n * H + r) * W + q) * C + c0),
                       _MM_HINT_T0);
      }
      for (int i = 0; i < A; ++i) {
        const int64_t r = ti * m + i - 1;
        for (int j = 0; j < A; ++j) {
          const int64_t q = tj * m + j - 1;
          const __m512 d = (r < 0 || r >= H || q < 0 || q >= W)
                               ? _mm512_setzero_ps()
                               : _mm512_maskz_loadu_ps(mask, px + ((n * H + r) * W + q) * C + c0);
          _mm512_store_ps(dbuf + (i * A + j) * 16, d);
        }
      }
      for (int p = 0; p < A; ++p) {
        __m512 row[A];
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int i = 0; i < A; ++i) {
            if ((Mask >> (p * A + i)) & 1)
              acc = _mm512_fmadd_ps(_mm512_set1_ps(B[p * A + i]),
                                    _mm512_load_ps(dbuf + (i * A + j) * 16), acc);
          }
          row[j] = acc;
        }
#pragma GCC unroll 8
        for (int qq = 0; qq < A; ++qq) {
          __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j) {
            if ((Mask >> (qq * A + j)) & 1)
              acc = _mm512_fmadd_ps(_mm512_set1_ps(B[qq * A + j]), row[j], acc);
          }
          store_position<Q8>(acc, p * A + qq, out, pos_stride, c0, mask, inv, zp);
        }
      }
    }
    return;
  }
  (void)prefetch;  // the tested form: rare (a transform of neither compiled pattern)
  __m512 rows[A][A];
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 mask = tail_mask(C - c0);
    for (int j = 0; j < A; ++j) {
      const int64_t q = tj * m + j - 1;
      __m512 d[A];
      for (int i = 0; i < A; ++i) {
        const int64_t r = ti * m + i - 1;
        d[i] = (r < 0 || r >= H || q < 0 || q >= W)
                   ? _mm512_setzero_ps()
                   : _mm512_maskz_loadu_ps(mask, px + ((n * H + r) * W + q) * C + c0);
      }
      for (int p = 0; p < A; ++p) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < A; ++i) {
          const float b = B[p * A + i];
          if (b != 0.0f) acc = _mm512_fmadd_ps(_mm512_set1_ps(b), d[i], acc);
        }
        rows[p][j] = acc;
      }
    }
    for (int p = 0; p < A; ++p) {
      for (int qq = 0; qq < A; ++qq) {
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < A; ++j) {
          const float b = B[qq * A + j];
          if (b != 0.0f) acc = _mm512_fmadd_ps(_mm512_set1_ps(b), rows[p][j], acc);
        }
        store_position<Q8>(acc, p * A + qq, out, pos_stride, c0, mask, inv, zp);
      }
    }
  }
}
#endif

// Whether the vector form serves alpha (4, 6 or 8: F2, F4, F6) in this build.
bool has_tile_v(int64_t a) {
#if defined(__AVX512F__)
  return a == 4 || a == 6 || a == 8;
#else
  (void)a;
  return false;
#endif
}

#if defined(__AVX512F__)
// f(mask) with a transform's nonzero pattern as a compile-time constant (a std::integral_constant)
// where it is one of the two compiled ones, Cook-Toom's or a dense matrix's, else with 0 (each
// entry tested at run time): the dispatch of the input and output transforms' tile kernels.
template <uint64_t CookToom, uint64_t Dense, typename F>
inline void with_pattern(uint64_t pattern, const F& f) {
  if (pattern == CookToom) return f(std::integral_constant<uint64_t, CookToom>{});
  if (pattern == Dense) return f(std::integral_constant<uint64_t, Dense>{});
  f(std::integral_constant<uint64_t, 0>{});
}

// input_tile_v for B's nonzero pattern (nonzero_pattern(B, A * A)): compiled for the Cook-Toom
// pattern and for a dense B, tested entry by entry for any other. Measured against the tested
// form (interleaved, 1 thread, Zen 5, 64 channels, float32 / 8-bit): Cook-Toom's F2 0.79x /
// 0.73x the time, F4 0.81x / 0.97x, F6 0.62x / 0.59x.
template <int A, bool Q8, uint64_t CookToom, uint64_t Dense>
void input_tile_pattern(uint64_t pattern, const float* px, const float* B, int64_t H, int64_t W,
                        int64_t C, int64_t m, int64_t n, int64_t ti, int64_t tj, void* out,
                        int64_t pos_stride, const float* inv, float zp, bool prefetch) {
  with_pattern<CookToom, Dense>(pattern, [&](auto mask) {
    input_tile_v<A, Q8, decltype(mask)::value>(px, B, H, W, C, m, n, ti, tj, out, pos_stride,
                                               inv, zp, prefetch);
  });
}
#endif

// The vector form for alpha 4, 6 or 8 (F2, F4, F6) in the AVX-512 build: whether it ran.
// pattern: nonzero_pattern(B, a * a), computed once per call of the caller.
template <bool Q8>
bool input_tile_fast(int64_t a, uint64_t pattern, const float* px, const float* B, int64_t H,
                     int64_t W, int64_t C, int64_t m, int64_t n, int64_t ti, int64_t tj,
                     void* out, int64_t pos_stride, const float* inv, float zp,
                     bool prefetch) {
#if defined(__AVX512F__)
  switch (a) {
    case 4:
      input_tile_pattern<4, Q8, kCookToomB4, kDense4>(pattern, px, B, H, W, C, m, n, ti, tj, out,
                                                      pos_stride, inv, zp, prefetch);
      return true;
    case 6:
      input_tile_pattern<6, Q8, kCookToomB6, kDense6>(pattern, px, B, H, W, C, m, n, ti, tj, out,
                                                      pos_stride, inv, zp, prefetch);
      return true;
    case 8:
      input_tile_pattern<8, Q8, kCookToomB8, kDense8>(pattern, px, B, H, W, C, m, n, ti, tj, out,
                                                      pos_stride, inv, zp, prefetch);
      return true;
    default: return false;
  }
#else
  (void)pattern;
  (void)prefetch;
  return false;
#endif
}

void check_input(const at::Tensor& x, const at::Tensor& bt) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.dim() == 4,
              "x must be a contiguous (N, H, W, C) float32 CPU tensor");
  TORCH_CHECK(bt.scalar_type() == at::kFloat && bt.is_contiguous() && bt.dim() == 2 &&
                  bt.size(0) == bt.size(1),
              "B_t must be a contiguous square float32 matrix");
}

}  // namespace

// Deploy Winograd F(m x m, 3 x 3), float32, channels-last: B^T d B of every input tile, read
// straight from x (N, H, W, C) with the conv's zero padding of 1 (and bottom/right up to whole
// tiles), for images n0 .. n0 + nb; returns v (alpha^2, nb * th * tw, C). One pass where the
// torch form pads, gathers and applies two GEMMs; the sums are the same up to float rounding.
at::Tensor winograd_input(const at::Tensor& x, const at::Tensor& bt, int64_t m, int64_t th,
                          int64_t tw, int64_t n0, int64_t nb) {
  check_input(x, bt);
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3), a = bt.size(0), T = th * tw;
  const int64_t NT = nb * T;
  at::Tensor v = at::empty({a * a, NT, C}, x.options());
  const float* px = x.data_ptr<float>();
  const float* B = bt.data_ptr<float>();
  float* pv = v.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(a * a * C, 1));
  const int64_t scratch = has_tile_v(a) ? 0 : a * a * C;  // the generic form's
  const uint64_t pattern = nonzero_pattern(B, a * a);
  const bool prefetch = worth_prefetching(x);
  at::parallel_for(0, NT, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> d(scratch), rows(scratch);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = n0 + tile / T, ti = (tile % T) / tw, tj = tile % tw;
      if (!input_tile_fast<false>(a, pattern, px, B, H, W, C, m, n, ti, tj, pv + tile * C, NT * C,
                                  nullptr, 0.0f, prefetch)) {
        input_tile(px, B, H, W, C, a, m, n, ti, tj, d.data(), rows.data(), pv + tile * C,
                   NT * C);
      }
    }
  });
  return v;
}

// The same transform quantized for an 8-bit Winograd-domain product: returns uint8 q
// (nb * th * tw, alpha^2, channel_stride), or (alpha^2, nb * th * tw, channel_stride) where
// position_major, the channels past C set to zero_point, q = clamp(round_half_even(v *
// inv_scale[p]) + zero_point, 0, 255) for position p, the values the torch chain (multiply,
// round, add, clamp, convert) gives on
// winograd_input's v, bit for bit; one pass where that chain reads and writes v five times
// more. Tile-major is the layout whose (1, alpha^2 * C, tiles, 1) channels-last view is a
// grouped 1x1 convolution's input, one group per position; q8_product reads position-major.
at::Tensor winograd_input_q8(const at::Tensor& x, const at::Tensor& bt, int64_t m, int64_t th,
                             int64_t tw, int64_t n0, int64_t nb, const at::Tensor& inv_scale,
                             int64_t zero_point, int64_t channel_stride,
                             bool position_major) {
  check_input(x, bt);
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3), a = bt.size(0), T = th * tw;
  const int64_t NT = nb * T, a2 = a * a;
  check_position_scales(inv_scale, a2, "inv_scale");
  TORCH_CHECK(zero_point >= 0 && zero_point <= 255, "zero_point must lie in [0, 255]");
  const int64_t Cs = channel_stride;  // >= C: the channels past C hold the zero point
  TORCH_CHECK(Cs >= C, "channel_stride must be at least the number of channels");
  at::Tensor q = position_major ? at::empty({a2, NT, Cs}, x.options().dtype(at::kByte))
                                : at::empty({NT, a2, Cs}, x.options().dtype(at::kByte));
  // element (tile, p, c) at tile * ts + p * ps + c
  const int64_t ts = position_major ? Cs : a2 * Cs, ps = position_major ? NT * Cs : Cs;
  const float* px = x.data_ptr<float>();
  const float* B = bt.data_ptr<float>();
  const float* inv = inv_scale.data_ptr<float>();
  const float zp = static_cast<float>(zero_point);
  uint8_t* pq = q.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(a2 * C, 1));
  const int64_t scratch = has_tile_v(a) ? 0 : a2 * C;  // the generic form's
  const uint64_t pattern = nonzero_pattern(B, a * a);
  const bool prefetch = worth_prefetching(x);
  at::parallel_for(0, NT, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> d(scratch), rows(scratch), v(scratch);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = n0 + tile / T, ti = (tile % T) / tw, tj = tile % tw;
      uint8_t* __restrict o = pq + tile * ts;
      if (input_tile_fast<true>(a, pattern, px, B, H, W, C, m, n, ti, tj, o, ps, inv, zp,
                                prefetch)) {
        if (Cs > C) {
          for (int64_t p = 0; p < a2; ++p)
            std::fill(o + p * ps + C, o + p * ps + Cs, static_cast<uint8_t>(zero_point));
        }
        continue;
      }
      input_tile(px, B, H, W, C, a, m, n, ti, tj, d.data(), rows.data(), v.data(), C);
      for (int64_t p = 0; p < a2; ++p) {
        const float s = inv[p];
        float* __restrict src = v.data() + p * C;
        uint8_t* __restrict dst = o + p * ps;
        // Two loops that vectorize: one with a conversion to uint8 in it did not, and called
        // libm's nearbyintf per value (7x slower on clipped data).
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          src[c] = std::min(std::max(std::nearbyint(src[c] * s) + zp, 0.0f), 255.0f);
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<uint8_t>(static_cast<int32_t>(src[c]));
        std::fill(dst + C, dst + Cs, static_cast<uint8_t>(zero_point));
      }
    }
  });
  return q;
}

// ---- The 8-bit Winograd-domain product on AVX-512 VNNI ----
//
// out[p][t][k] = (sum_c q[p][t][c] w[p][c][k] - zero_point * wsum[p][k]) * wscale[p][k]: one
// u8 x s8 GEMM per tile position with int32 sums (exact), the input's zero point taken out
// through the weights' sums, and the per-channel weight scale, as oneDNN's int8 convolution
// computes it. The weights come packed (WinogradConv._vnni_weights) as (alpha^2, K / 16,
// C / 4, 16, 4): one 64-byte vector holds 4 consecutive input channels of 16 output channels,
// what vpdpbusd multiplies with 4 bytes of one tile broadcast. A block of kTB tiles x NKB * 16
// output channels accumulates in registers. The grouped 1x1 convolution that oneDNN runs for
// the same product reached a quarter of its direct convolution's rate here (64 channels a
// group); this kernel is built only in the AVX-512 build and runs only where the CPU has VNNI.
#if defined(__AVX512F__)
#define WASEARCH_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
namespace {

constexpr int kTB = 6;   // tiles per register block
constexpr int kNKB = 4;  // 16-channel output blocks per register block

// 16 output channels of one tile: (acc - zero_point * wsum) * wscale, those past k_left masked.
// A function of its own with the kernel's target, so that it inlines (a lambda inside the
// kernel does not inherit the target, is not inlined, and its by-reference arguments kept
// every accumulator in memory).
WASEARCH_VNNI inline void q8_store(__m512i acc, int32_t zp, const int32_t* wsum,
                                   const float* wscale, int64_t k_left, float* out) {
  const __m512i comp = _mm512_mullo_epi32(_mm512_set1_epi32(zp), _mm512_loadu_si512(wsum));
  const __m512 y =
      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, comp)), _mm512_loadu_ps(wscale));
  _mm512_mask_storeu_ps(out, tail_mask(k_left), y);
}

// acc += the u8 x s8 dot products of b and w (vpdpbusd), in place. Written as the instruction
// itself: with the intrinsic, GCC 12 copied each accumulator to a spare register and back, and
// to the stack, around every vpdpbusd of the 6 x 4 block (some 48 moves and 20 stores per 24
// products: the kernel ran at ~2.4 cycles per product), since the intrinsic's result is a new
// value where the instruction accumulates into its destination.
WASEARCH_VNNI inline void q8_dpbusd(__m512i& acc, __m512i b, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(w));
}

// One register block: TB tiles x NKB * 16 output channels, every accumulator a named
// variable, the blocks past TB or NKB compiled away.
#define WASEARCH_Q8_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int TB, int NKB>
WASEARCH_VNNI void q8_block(const uint8_t* q, int64_t q_stride, const int8_t* w,
                            int64_t w_stride, int64_t c4, const int32_t* wsum,
                            const float* wscale, int32_t zp, float* out, int64_t out_stride,
                            int64_t k_left) {
  static_assert(TB >= 1 && TB <= 6 && NKB >= 1 && NKB <= 4, "register block");
#define WASEARCH_Q8_DECL(t)                                                          \
  __m512i acc##t##0 = _mm512_setzero_si512(), acc##t##1 = _mm512_setzero_si512(), \
          acc##t##2 = _mm512_setzero_si512(), acc##t##3 = _mm512_setzero_si512();
  WASEARCH_Q8_ROWS(WASEARCH_Q8_DECL)
#undef WASEARCH_Q8_DECL
  for (int64_t c = 0; c < c4; ++c) {
    const int8_t* wc = w + c * 64;
    const __m512i w0 = _mm512_loadu_si512(reinterpret_cast<const void*>(wc));
    const __m512i w1 = NKB > 1 ? _mm512_loadu_si512(reinterpret_cast<const void*>(wc + w_stride))
                               : w0;
    const __m512i w2 =
        NKB > 2 ? _mm512_loadu_si512(reinterpret_cast<const void*>(wc + 2 * w_stride)) : w0;
    const __m512i w3 =
        NKB > 3 ? _mm512_loadu_si512(reinterpret_cast<const void*>(wc + 3 * w_stride)) : w0;
#define WASEARCH_Q8_STEP(t)                                                   \
  if constexpr (TB > t) {                                                     \
    int32_t four;                                                             \
    std::memcpy(&four, q + t * q_stride + c * 4, 4);                          \
    const __m512i b = _mm512_set1_epi32(four);                                \
    q8_dpbusd(acc##t##0, b, w0);                                              \
    if constexpr (NKB > 1) q8_dpbusd(acc##t##1, b, w1);                       \
    if constexpr (NKB > 2) q8_dpbusd(acc##t##2, b, w2);                       \
    if constexpr (NKB > 3) q8_dpbusd(acc##t##3, b, w3);                       \
  }
    WASEARCH_Q8_ROWS(WASEARCH_Q8_STEP)
#undef WASEARCH_Q8_STEP
  }
  // (acc - zero_point * wsum) * wscale, the channels past K masked off
#define WASEARCH_Q8_STORE(t)                                                            \
  if constexpr (TB > t) {                                                               \
    q8_store(acc##t##0, zp, wsum, wscale, k_left, out + t * out_stride);                \
    if constexpr (NKB > 1)                                                              \
      q8_store(acc##t##1, zp, wsum + 16, wscale + 16, k_left - 16, out + t * out_stride + 16); \
    if constexpr (NKB > 2)                                                              \
      q8_store(acc##t##2, zp, wsum + 32, wscale + 32, k_left - 32, out + t * out_stride + 32); \
    if constexpr (NKB > 3)                                                              \
      q8_store(acc##t##3, zp, wsum + 48, wscale + 48, k_left - 48, out + t * out_stride + 48); \
  }
  WASEARCH_Q8_ROWS(WASEARCH_Q8_STORE)
#undef WASEARCH_Q8_STORE
}
#undef WASEARCH_Q8_ROWS

template <int TB>
WASEARCH_VNNI void q8_tiles(int nkb, const uint8_t* q, int64_t q_stride, const int8_t* w,
                            int64_t w_stride, int64_t c4, const int32_t* wsum,
                            const float* wscale, int32_t zp, float* out, int64_t out_stride,
                            int64_t k_left) {
  switch (nkb) {
    case 1: return q8_block<TB, 1>(q, q_stride, w, w_stride, c4, wsum, wscale, zp, out,
                                   out_stride, k_left);
    case 2: return q8_block<TB, 2>(q, q_stride, w, w_stride, c4, wsum, wscale, zp, out,
                                   out_stride, k_left);
    case 3: return q8_block<TB, 3>(q, q_stride, w, w_stride, c4, wsum, wscale, zp, out,
                                   out_stride, k_left);
    default: return q8_block<TB, 4>(q, q_stride, w, w_stride, c4, wsum, wscale, zp, out,
                                    out_stride, k_left);
  }
}

// Tiles t0 .. t1 of position p, every output channel; tile t's K values at
// po + p * out_pos_stride + (t - out_t0) * K.
WASEARCH_VNNI void q8_position(const uint8_t* pq, const int8_t* pw, const int32_t* ps,
                               const float* psc, float* po, int64_t p, int64_t t0, int64_t t1,
                               int64_t NT, int64_t Cs, int64_t K, int64_t Kb, int32_t zp,
                               int64_t out_pos_stride, int64_t out_t0) {
  const int64_t c4 = Cs / 4, Kp = Kb * 16;
  const int8_t* wp = pw + p * Kb * c4 * 64;
  for (int64_t kb = 0; kb < Kb; kb += kNKB) {
    const int nkb = static_cast<int>(std::min<int64_t>(kNKB, Kb - kb));
    const int8_t* w = wp + kb * c4 * 64;
    const int32_t* wsum = ps + p * Kp + kb * 16;
    const float* wscale = psc + p * Kp + kb * 16;
    const int64_t k_left = K - kb * 16;
    for (int64_t t = t0; t < t1; t += kTB) {
      const int tb = static_cast<int>(std::min<int64_t>(kTB, t1 - t));
      const uint8_t* q = pq + (p * NT + t) * Cs;
      float* out = po + p * out_pos_stride + (t - out_t0) * K + kb * 16;
      const int64_t qs = Cs, os = K, ws = c4 * 64;
      switch (tb) {
        case 1: q8_tiles<1>(nkb, q, qs, w, ws, c4, wsum, wscale, zp, out, os, k_left); break;
        case 2: q8_tiles<2>(nkb, q, qs, w, ws, c4, wsum, wscale, zp, out, os, k_left); break;
        case 3: q8_tiles<3>(nkb, q, qs, w, ws, c4, wsum, wscale, zp, out, os, k_left); break;
        case 4: q8_tiles<4>(nkb, q, qs, w, ws, c4, wsum, wscale, zp, out, os, k_left); break;
        case 5: q8_tiles<5>(nkb, q, qs, w, ws, c4, wsum, wscale, zp, out, os, k_left); break;
        default: q8_tiles<6>(nkb, q, qs, w, ws, c4, wsum, wscale, zp, out, os, k_left);
      }
    }
  }
}

}  // namespace
#endif

namespace {

// The packed 8-bit weights q8_product reads, for alpha^2 = a2 positions, Cs (padded) input and
// K output channels: wpack int8 (a2, K16 / 16, Cs / 4, 16, 4), wsum int32 and wscale float32
// (a2, K16), K16 the multiple of 16 at or above K.
void check_q8_weights(const at::Tensor& wpack, const at::Tensor& wsum, const at::Tensor& wscale,
                      int64_t a2, int64_t Cs, int64_t K) {
  TORCH_CHECK(wpack.scalar_type() == at::kChar && wpack.is_contiguous() && wpack.dim() == 5 &&
                  wpack.size(0) == a2 && wpack.size(2) == Cs / 4 && wpack.size(3) == 16 &&
                  wpack.size(4) == 4,
              "wpack must be a contiguous (alpha^2, K16 / 16, Cs / 4, 16, 4) int8 tensor");
  const int64_t Kb = wpack.size(1);
  TORCH_CHECK(K > (Kb - 1) * 16 && K <= Kb * 16, "K must lie in (K16 - 16, K16]");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.is_contiguous() &&
                  wsum.numel() == a2 * Kb * 16,
              "wsum must be (alpha^2, K16) contiguous int32");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() &&
                  wscale.numel() == a2 * Kb * 16,
              "wscale must be (alpha^2, K16) contiguous float32");
}

}  // namespace

// Whether q8_product runs here: the AVX-512 build, on a CPU with VNNI.
bool q8_product_supported() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// q (alpha^2, tiles, Cs) uint8 from winograd_input_q8 (Cs a multiple of 4), wpack int8
// (alpha^2, K16 / 16, Cs / 4, 16, 4), wsum int32 and wscale float32 (alpha^2, K16), K <= K16
// the output channels: returns float32 (alpha^2, tiles, K), the product dequantized by the
// weights' scales (the input's scale per position stays for winograd_output's pos_scale).
at::Tensor q8_product(const at::Tensor& q, const at::Tensor& wpack, const at::Tensor& wsum,
                      const at::Tensor& wscale, int64_t K, int64_t zero_point) {
  TORCH_CHECK(q8_product_supported(), "q8_product needs the AVX-512 build on a CPU with VNNI");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kByte && q.is_contiguous() &&
                  q.dim() == 3 && q.size(2) % 4 == 0,
              "q must be a contiguous (alpha^2, tiles, Cs) uint8 tensor, Cs a multiple of 4");
  const int64_t a2 = q.size(0), NT = q.size(1), Cs = q.size(2);
  check_q8_weights(wpack, wsum, wscale, a2, Cs, K);
  const int64_t Kb = wpack.size(1);
  at::Tensor out = at::empty({a2, NT, K}, q.options().dtype(at::kFloat));
#if defined(__AVX512F__)
  const uint8_t* pq = q.data_ptr<uint8_t>();
  const int8_t* pw = wpack.data_ptr<int8_t>();
  const int32_t* ps = wsum.data_ptr<int32_t>();
  const float* psc = wscale.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int32_t zp = static_cast<int32_t>(zero_point);
  // Work items: (position, block of tiles); a block's weights stay in cache over its tiles.
  const int64_t block = 96, nblk = (NT + block - 1) / block;
  at::parallel_for(0, a2 * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item % a2, t0 = (item / a2) * block;
      q8_position(pq, pw, ps, psc, po, p, t0, std::min(NT, t0 + block), NT, Cs, K, Kb, zp,
                  NT * K, 0);
    }
  });
#endif
  return out;
}

// The training pipeline's Winograd-domain product on two 8-bit grids, u = u_codes * su and
// v = v_codes * sv: out[p] = (u_codes[p] @ v_codes[p]) * scale[p], scale = su * sv per position.
// u_codes (alpha^2, K, C) and v_codes (alpha^2, C, NT) int8 levels (at most 127 in magnitude),
// scale float32 (alpha^2); returns float32 (alpha^2, K, NT). The integer sums are exact (int32,
// then one conversion and one product: float32 holds them exactly up to C * 127 * 127 < 2^24,
// C up to 1040), so the result is the exact product rounded once, where torch.bmm on the float
// values rounds after every addition. Runs q8_position's u8 x s8 kernel with the roles of its
// operands swapped: u's rows, offset by 128 to unsigned, are the broadcast rows; v, packed as
// (alpha^2, NT16 / 16, Cs / 4, 16, 4), the vector operand; v's column sums take the offset out.
at::Tensor q8_grid_bmm(const at::Tensor& u_codes, const at::Tensor& v_codes,
                       const at::Tensor& scale) {
  TORCH_CHECK(q8_product_supported(), "q8_grid_bmm needs the AVX-512 build on a CPU with VNNI");
  TORCH_CHECK(u_codes.device().is_cpu() && u_codes.scalar_type() == at::kChar &&
                  u_codes.dim() == 3 && v_codes.device().is_cpu() &&
                  v_codes.scalar_type() == at::kChar && v_codes.dim() == 3 &&
                  u_codes.size(0) == v_codes.size(0) && u_codes.size(2) == v_codes.size(1),
              "u_codes (alpha^2, K, C) and v_codes (alpha^2, C, NT) must be int8 CPU tensors");
  const int64_t a2 = u_codes.size(0), K = u_codes.size(1), C = u_codes.size(2);
  const int64_t NT = v_codes.size(2);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == a2,
              "scale must hold alpha^2 float32 values");
  at::Tensor out = at::empty({a2, K, NT}, u_codes.options().dtype(at::kFloat));
#if defined(__AVX512F__)
  const at::Tensor uc = u_codes.contiguous(), vc = v_codes.contiguous();
  const at::Tensor sc = scale.contiguous();
  const int64_t Cs = (C + 3) / 4 * 4, c4 = Cs / 4, Nb = (NT + 15) / 16, Np = Nb * 16;
  // u's rows offset to unsigned (a padded channel's 128 meets a zero of v: no contribution)
  at::Tensor q = at::empty({a2, K, Cs}, uc.options().dtype(at::kByte));
  at::Tensor w = at::empty({a2, Nb, c4, 16, 4}, uc.options());
  at::Tensor sums = at::empty({a2, Np}, uc.options().dtype(at::kInt));
  at::Tensor scales = at::empty({a2, Np}, uc.options().dtype(at::kFloat));
  const int8_t* pu = uc.data_ptr<int8_t>();
  const int8_t* pv = vc.data_ptr<int8_t>();
  uint8_t* pq = q.data_ptr<uint8_t>();
  int8_t* pw = w.data_ptr<int8_t>();
  int32_t* ps = sums.data_ptr<int32_t>();
  float* psc = scales.data_ptr<float>();
  const float* pscale = sc.data_ptr<float>();
  at::parallel_for(0, a2, 1, [&](int64_t begin, int64_t end) {
    alignas(16) int8_t zeros[16] = {}, part[4][16];
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t k = 0; k < K; ++k) {
        const int8_t* src = pu + (p * K + k) * C;
        uint8_t* dst = pq + (p * K + k) * Cs;
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<uint8_t>(src[c]) ^ 0x80u;
        for (int64_t c = C; c < Cs; ++c) dst[c] = 128;
      }
      const int8_t* vp = pv + p * C * NT;
      int8_t* wp = pw + p * Nb * c4 * 64;
      int32_t* sp = ps + p * Np;
      std::fill(sp, sp + Np, 0);
      std::fill(psc + p * Np, psc + (p + 1) * Np, pscale[p]);
      // 4 channels x 16 columns at a time, transposed to (16 columns, 4 channels) by byte and
      // word interleaves; the columns' sums kept as 16 int32 lanes
      for (int64_t cb = 0; cb < c4; ++cb) {
        const int8_t* rows[4];
        for (int64_t j = 0; j < 4; ++j) rows[j] = cb * 4 + j < C ? vp + (cb * 4 + j) * NT : nullptr;
        for (int64_t nb = 0; nb < Nb; ++nb) {
          const int64_t t0 = nb * 16, nt = std::min<int64_t>(16, NT - t0);
          __m128i r[4];
          for (int64_t j = 0; j < 4; ++j) {
            const int8_t* src = rows[j] ? rows[j] + t0 : zeros;
            if (rows[j] && nt < 16) {
              std::memset(part[j], 0, 16);
              std::memcpy(part[j], src, nt);
              src = part[j];
            }
            r[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
          }
          const __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
          const __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
          __m128i* block = reinterpret_cast<__m128i*>(wp + (nb * c4 + cb) * 64);
          _mm_storeu_si128(block, _mm_unpacklo_epi16(lo01, lo23));
          _mm_storeu_si128(block + 1, _mm_unpackhi_epi16(lo01, lo23));
          _mm_storeu_si128(block + 2, _mm_unpacklo_epi16(hi01, hi23));
          _mm_storeu_si128(block + 3, _mm_unpackhi_epi16(hi01, hi23));
          __m512i sum = _mm512_loadu_si512(sp + t0);
          for (int64_t j = 0; j < 4; ++j) sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(r[j]));
          _mm512_storeu_si512(sp + t0, sum);
        }
      }
    }
  });
  float* po = out.data_ptr<float>();
  // Work items: (position, block of u's rows); the packed v of a position stays in cache.
  const int64_t block = 48, nblk = (K + block - 1) / block;
  at::parallel_for(0, a2 * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item % a2, k0 = (item / a2) * block;
      q8_position(pq, pw, ps, psc, po, p, k0, std::min(K, k0 + block), K, Cs, NT, Nb, 128,
                  K * NT, 0);
    }
  });
#endif
  return out;
}

// The backward of q8_grid_bmm's product (GridBmm): grad_u[p] = sv[p] * grad[p] @ v_codes[p]^T
// (K x C) and grad_v[p] = su[p] * u_codes[p]^T @ grad[p] (C x NT), float32 products read
// straight from the levels (no float u or v rebuilt), in AVX-512 registers: on Zen 5 torch.bmm
// runs MKL's AVX2 code, about half this machine's float rate. grad_u sums along the tiles, 4 x 4
// outputs at a time (16 tiles per vector, the lanes added at the end: the same order for any
// number of threads); grad_v broadcasts u's levels (as floats, 8 channels) against 32 tiles of
// grad, copied to a small contiguous panel first (grad's rows lie NT floats apart).
#if defined(__AVX512F__)
namespace {

// Below this many tiles, grad_u sums as an (8 x 32)-blocked product of transposed copies.
constexpr int64_t kShortSums = 256;

// 16 int8 levels as floats (exact)
inline __m512 levels16(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

void grid_grad_u(const float* g, const int8_t* v, float sv, int64_t K, int64_t C, int64_t NT,
                 float* out) {
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    const float* gr[4];
    for (int i = 0; i < 4; ++i) gr[i] = g + std::min<int64_t>(k0 + i, K - 1) * NT;
    for (int64_t c0 = 0; c0 < C; c0 += 4) {
      const int8_t* vr[4];
      for (int j = 0; j < 4; ++j) vr[j] = v + std::min<int64_t>(c0 + j, C - 1) * NT;
      __m512 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
      for (int64_t t = 0; t < NT; t += 16) {
        const __mmask16 mask = lanes_left(NT - t);
        __m512 gv[4];
        for (int i = 0; i < 4; ++i) gv[i] = _mm512_maskz_loadu_ps(mask, gr[i] + t);
        for (int j = 0; j < 4; ++j) {
          const __m512 vv = levels16(vr[j] + t, mask);
          for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_fmadd_ps(gv[i], vv, acc[i][j]);
        }
      }
      for (int i = 0; i < 4 && k0 + i < K; ++i)
        for (int j = 0; j < 4 && c0 + j < C; ++j)
          out[(k0 + i) * C + c0 + j] = _mm512_reduce_add_ps(acc[i][j]) * sv;
    }
  }
}

// out[i][j] = scale * sum_k a[k][i] * b[k][j] for i < M, j < N (out's rows ldo apart): a packed
// as (M / 8 blocks, Kred, 8) floats, b's columns [j0, j0 + 32) copied by fill(panel, j0) as
// Kred x 32 floats (zeros past N). 8 x 32 outputs in 16 registers; rows of out that make a
// large tensor are written past the caches (store_rows, as the transforms' position-major rows).
template <typename Fill>
void nn_product(const float* a, int64_t M, int64_t Kred, int64_t N, float scale, float* out,
                int64_t ldo, bool stream, std::vector<float>& panel, const Fill& fill,
                const int8_t* mask = nullptr) {
  const int64_t M8 = (M + 7) / 8;
  panel.resize(Kred * 32);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < N; j0 += 32) {
    fill(panel.data(), j0);
    const __mmask16 m0 = lanes_left(N - j0), m1 = lanes_left(N - j0 - 16);
    const bool whole = stream && N - j0 >= 32 && (ldo & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(out + j0) & 63) == 0;
    for (int64_t ib = 0; ib < M8; ++ib) {
      const float* ab = a + ib * Kred * 8;
      __m512 acc[8][2];
      for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      for (int64_t k = 0; k < Kred; ++k) {
        const __m512 b0 = _mm512_loadu_ps(panel.data() + k * 32);
        const __m512 b1 = _mm512_loadu_ps(panel.data() + k * 32 + 16);
        for (int i = 0; i < 8; ++i) {
          const __m512 x = _mm512_set1_ps(ab[k * 8 + i]);
          acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
        }
      }
      for (int i = 0; i < 8 && ib * 8 + i < M; ++i) {
        float* o = out + (ib * 8 + i) * ldo + j0;
        __m512 y0 = _mm512_mul_ps(acc[i][0], s), y1 = _mm512_mul_ps(acc[i][1], s);
        if (mask) {  // mask * value, as masked_grad multiplies (0/1 exact)
          const int8_t* mr = mask + (ib * 8 + i) * ldo + j0;
          y0 = _mm512_mul_ps(levels16(mr, m0), y0);
          y1 = _mm512_mul_ps(levels16(mr + 16, m1), y1);
        }
        if (whole) {
          _mm512_stream_ps(o, y0);
          _mm512_stream_ps(o + 16, y1);
        } else {
          _mm512_mask_storeu_ps(o, m0, y0);
          _mm512_mask_storeu_ps(o + 16, m1, y1);
        }
      }
    }
  }
}

// grad_v = su * u^T @ grad: a = u's levels as floats, b = grad's rows.
void grid_grad_v(const float* g, const int8_t* u, float su, int64_t K, int64_t C, int64_t NT,
                 float* out, bool stream, std::vector<float>& a, std::vector<float>& panel,
                 const int8_t* mask) {
  const int64_t C8 = (C + 7) / 8;
  a.resize(C8 * K * 8);  // a[cb][k][i] = u[k][cb * 8 + i], 0 past C
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t cb = 0; cb < C8; ++cb) {
      const int64_t n = std::min<int64_t>(8, C - cb * 8);
      int64_t eight = 0;
      std::memcpy(&eight, u + k * C + cb * 8, n);
      const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight)));
      _mm256_storeu_ps(a.data() + (cb * K + k) * 8, f);
    }
  }
  nn_product(a.data(), C, K, NT, su, out, NT, stream, panel, [&](float* pn, int64_t t0) {
    const __mmask16 m0 = lanes_left(NT - t0), m1 = lanes_left(NT - t0 - 16);
    for (int64_t k = 0; k < K; ++k) {
      _mm512_storeu_ps(pn + k * 32, _mm512_maskz_loadu_ps(m0, g + k * NT + t0));
      _mm512_storeu_ps(pn + k * 32 + 16, _mm512_maskz_loadu_ps(m1, g + k * NT + t0 + 16));
    }
  }, mask);
}

// grad_u = sv * grad @ v^T for few tiles (the sums along them too short for grid_grad_u's
// lanes): a = grad transposed, b = v's levels transposed, as floats.
void grid_grad_u_short(const float* g, const int8_t* v, float sv, int64_t K, int64_t C,
                       int64_t NT, float* out, std::vector<float>& a, std::vector<float>& panel) {
  const int64_t K8 = (K + 7) / 8;
  a.assign(K8 * NT * 8, 0.0f);  // a[kb][t][i] = g[kb * 8 + i][t]
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < NT; ++t) a[((k / 8) * NT + t) * 8 + k % 8] = g[k * NT + t];
  nn_product(a.data(), K, NT, C, sv, out, C, false, panel, [&](float* pn, int64_t c0) {
    for (int64_t t = 0; t < NT; ++t)
      for (int64_t j = 0; j < 32; ++j) pn[t * 32 + j] = c0 + j < C ? v[(c0 + j) * NT + t] : 0.0f;
  });
}

}  // namespace
#endif

// Whether grid_bmm_backward runs here (the AVX-512 build).
bool grid_bmm_backward_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// grad (alpha^2, K, NT) float32, u_codes (alpha^2, K, C) and v_codes (alpha^2, C, NT) int8,
// u_scale and v_scale float32 (alpha^2): {grad_u (alpha^2, K, C) if need_u, grad_v (alpha^2,
// C, NT) if need_v} (undefined tensors where not asked). v_mask (optional, int8 0/1 laid out
// as grad_v): grad_v multiplied by it as it is written (masked_grad's products), the
// straight-through gradient of v's quantizer.
std::vector<at::Tensor> grid_bmm_backward(const at::Tensor& grad, const at::Tensor& u_codes,
                                          const at::Tensor& u_scale, const at::Tensor& v_codes,
                                          const at::Tensor& v_scale, bool need_u, bool need_v,
                                          const std::optional<at::Tensor>& v_mask) {
  TORCH_CHECK(grid_bmm_backward_supported(), "grid_bmm_backward needs the AVX-512 build");
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() == 3,
              "grad must be a (alpha^2, K, NT) float32 CPU tensor");
  const int64_t a2 = grad.size(0), K = grad.size(1), NT = grad.size(2);
  TORCH_CHECK(u_codes.scalar_type() == at::kChar && v_codes.scalar_type() == at::kChar &&
                  u_codes.dim() == 3 && v_codes.dim() == 3 && u_codes.size(0) == a2 &&
                  u_codes.size(1) == K && v_codes.size(0) == a2 && v_codes.size(2) == NT &&
                  u_codes.size(2) == v_codes.size(1),
              "u_codes (alpha^2, K, C) and v_codes (alpha^2, C, NT) must be int8");
  const int64_t C = u_codes.size(2);
  TORCH_CHECK(u_scale.scalar_type() == at::kFloat && u_scale.numel() == a2 &&
                  v_scale.scalar_type() == at::kFloat && v_scale.numel() == a2,
              "u_scale and v_scale must hold alpha^2 float32 values");
  const bool masked = v_mask.has_value() && v_mask->defined();
  TORCH_CHECK(!masked || (need_v && v_mask->scalar_type() == at::kChar &&
                          v_mask->is_contiguous() && v_mask->numel() == a2 * C * NT),
              "v_mask must be a contiguous int8 tensor laid out as grad_v");
  at::Tensor gu, gv;
#if defined(__AVX512F__)
  const int8_t* pmask = masked ? v_mask->data_ptr<int8_t>() : nullptr;
  const at::Tensor gc = grad.contiguous(), uc = u_codes.contiguous(), vc = v_codes.contiguous();
  const at::Tensor us = u_scale.contiguous(), vs = v_scale.contiguous();
  if (need_u) gu = at::empty({a2, K, C}, gc.options());
  if (need_v) gv = at::empty({a2, C, NT}, gc.options());
  const float* pg = gc.data_ptr<float>();
  const int8_t* pu = uc.data_ptr<int8_t>();
  const int8_t* pv = vc.data_ptr<int8_t>();
  const float* pus = us.data_ptr<float>();
  const float* pvs = vs.data_ptr<float>();
  float* pgu = need_u ? gu.data_ptr<float>() : nullptr;
  float* pgv = need_v ? gv.data_ptr<float>() : nullptr;
  const bool stream = a2 * C * NT * int64_t{sizeof(float)} >= kLargeRows;
  at::parallel_for(0, a2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a, panel;
    for (int64_t p = begin; p < end; ++p) {
      const float* g = pg + p * K * NT;
      if (pgu && NT >= kShortSums) {
        grid_grad_u(g, pv + p * C * NT, pvs[p], K, C, NT, pgu + p * K * C);
      } else if (pgu) {
        grid_grad_u_short(g, pv + p * C * NT, pvs[p], K, C, NT, pgu + p * K * C, a, panel);
      }
      if (pgv) {
        grid_grad_v(g, pu + p * K * C, pus[p], K, C, NT, pgv + p * C * NT, stream, a, panel,
                    pmask ? pmask + p * C * NT : nullptr);
      }
    }
    if (stream) stream_fence();  // this thread's non-temporal stores, before the join
  });
  if (stream) stream_fence();
#endif
  return {gu, gv};
}

namespace {

// The output transform's first-pass weights, w1[(r * a + j) * a + i]: the weight of M[i][j] in
// row r, A[r][i] times position (i, j)'s scale (ps: alpha^2 values, or null for none).
std::vector<float> first_pass_weights(const float* A, int64_t m, int64_t a, const float* ps) {
  std::vector<float> w1(m * a * a);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < a; ++j)
      for (int64_t i = 0; i < a; ++i)
        w1[(r * a + j) * a + i] = A[r * a + i] * (ps ? ps[i * a + j] : 1.0f);
  return w1;
}

// The nonzero patterns of the Cook-Toom A^T of F2, F4 and F6 (m x alpha; row r, column i at
// bit r * alpha + i) and of a dense one: the output transform's compiled forms, as the input
// transform's (input_tile_pattern).
constexpr uint64_t kCookToomA4 = 0xe7, kCookToomA6 = 0xf9e79f, kCookToomA8 = 0xfe7e7e7e7e7f;
constexpr uint64_t kDenseA4 = 0xff, kDenseA6 = 0xffffff, kDenseA8 = 0xffffffffffff;

// The pattern output_tile_fast compiles for A^T (m x a) and the first pass's weights w1 made
// from it with the position scales ps (null: none): A^T's, where every scale is nonzero (w1's
// zeros are then A^T's); else 0, each entry tested.
uint64_t output_pattern(const float* At, int64_t m, int64_t a, const float* ps) {
  for (int64_t p = 0; ps && p < a * a; ++p)
    if (ps[p] == 0.0f) return 0;
  return nonzero_pattern(At, m * a);
}

#if defined(__AVX512F__)
// One tile of winograd_output with 16 channels at a time in vector registers, alpha = A (m =
// A - 2) known at compile time: each column j of M loaded once, the first pass's weights w1
// (A, position-scaled) applied along it, then A along the rows, with the bias, every product a
// fused multiply-add; rows and columns past rows_in / cols_in (the crop) skipped. Mask: A^T's
// nonzero pattern when compiled (output_pattern), 0 to test each entry; the nonzero entries'
// products are added in the same order either way.
template <int A, uint64_t Mask>
void output_tile_v(const float* pm, int64_t sp, const float* w1, const float* At,
                   const float* pb, int64_t K, int64_t rows_in, int64_t cols_in, float* po,
                   int64_t row_stride) {
  constexpr int m = A - 2;
  __m512 rows[m][A];
  for (int64_t c0 = 0; c0 < K; c0 += 16) {
    const __mmask16 mask = tail_mask(K - c0);
    for (int j = 0; j < A; ++j) {
      __m512 col[A];
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i) col[i] = _mm512_maskz_loadu_ps(mask, pm + (i * A + j) * sp + c0);
#pragma GCC unroll 8
      for (int r = 0; r < m; ++r) {
        if (r >= rows_in) break;
        __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i) {
          const float w = w1[(r * A + j) * A + i];
          if (Mask ? ((Mask >> (r * A + i)) & 1) != 0 : w != 0.0f)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w), col[i], acc);
        }
        rows[r][j] = acc;
      }
    }
    const __m512 bias = pb ? _mm512_maskz_loadu_ps(mask, pb + c0) : _mm512_setzero_ps();
    for (int r = 0; r < m; ++r) {
      if (r >= rows_in) break;
#pragma GCC unroll 8
      for (int s2 = 0; s2 < m; ++s2) {
        if (s2 >= cols_in) break;
        __m512 acc = bias;
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          const float w = At[s2 * A + j];
          if (Mask ? ((Mask >> (s2 * A + j)) & 1) != 0 : w != 0.0f)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w), rows[r][j], acc);
        }
        _mm512_mask_storeu_ps(po + r * row_stride + s2 * K + c0, mask, acc);
      }
    }
  }
}

template <int A, uint64_t CookToom, uint64_t Dense>
void output_tile_pattern(uint64_t pattern, const float* pm, int64_t sp, const float* w1,
                         const float* At, const float* pb, int64_t K, int64_t rows_in,
                         int64_t cols_in, float* po, int64_t row_stride) {
  with_pattern<CookToom, Dense>(pattern, [&](auto mask) {
    output_tile_v<A, decltype(mask)::value>(pm, sp, w1, At, pb, K, rows_in, cols_in, po,
                                            row_stride);
  });
}
#endif

// The vector form for alpha 4, 6 or 8 in the AVX-512 build: whether it ran. pattern:
// output_pattern of A^T and the position scales w1 was made with.
bool output_tile_fast(int64_t a, uint64_t pattern, const float* pm, int64_t sp, const float* w1,
                      const float* At, const float* pb, int64_t K, int64_t rows_in,
                      int64_t cols_in, float* po, int64_t row_stride) {
#if defined(__AVX512F__)
  switch (a) {
    case 4:
      output_tile_pattern<4, kCookToomA4, kDenseA4>(pattern, pm, sp, w1, At, pb, K, rows_in,
                                                    cols_in, po, row_stride);
      return true;
    case 6:
      output_tile_pattern<6, kCookToomA6, kDenseA6>(pattern, pm, sp, w1, At, pb, K, rows_in,
                                                    cols_in, po, row_stride);
      return true;
    case 8:
      output_tile_pattern<8, kCookToomA8, kDenseA8>(pattern, pm, sp, w1, At, pb, K, rows_in,
                                                    cols_in, po, row_stride);
      return true;
    default: return false;
  }
#else
  (void)pattern;
  return false;
#endif
}

}  // namespace

// A^T M A of every tile of mprod (alpha^2, nb * th * tw, K), plus bias, written into out
// (N, th * m, tw * m, K) at images n0 .. n0 + nb: the output transform and the untiling in one
// pass. mprod may be any layout whose channels are contiguous (stride 1 along K): the 8-bit
// product comes tile-major. pos_scale (alpha^2 values, or None) multiplies position p's
// product first (in the weights of the first pass: equal up to float rounding).
void winograd_output(const at::Tensor& mprod, const at::Tensor& at_, const at::Tensor& bias,
                     at::Tensor& out, int64_t th, int64_t tw, int64_t n0,
                     const std::optional<at::Tensor>& pos_scale) {
  TORCH_CHECK(mprod.device().is_cpu() && mprod.scalar_type() == at::kFloat &&
                  mprod.dim() == 3 && mprod.stride(2) == 1,
              "mprod must be an (alpha^2, tiles, K) float32 CPU tensor, K contiguous");
  TORCH_CHECK(at_.scalar_type() == at::kFloat && at_.is_contiguous() && at_.dim() == 2,
              "A_t must be a contiguous float32 matrix");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 4,
              "out must be a contiguous (N, H, W, K) float32 tensor");
  const int64_t m = at_.size(0), a = at_.size(1), NT = mprod.size(1), K = mprod.size(2);
  const int64_t T = th * tw, Ho = out.size(1), Wo = out.size(2);
  const int64_t sp = mprod.stride(0), st = mprod.stride(1);
  // out may be the cropped output (H, W not multiples of m): the tiles' rows and columns past
  // it are neither computed nor written, and out stays one contiguous NHWC tensor.
  TORCH_CHECK(mprod.size(0) == a * a && out.size(3) == K && Ho <= th * m &&
                  Ho > (th - 1) * m && Wo <= tw * m && Wo > (tw - 1) * m,
              "shapes of mprod, A_t and out disagree");
  const bool has_bias = bias.defined() && bias.numel() > 0;  // empty: no bias
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == K &&
                            bias.is_contiguous()),
              "bias must be K contiguous float32 values");
  const bool scaled = pos_scale.has_value();
  if (scaled) check_position_scales(*pos_scale, a * a, "pos_scale");
  const float* pm = mprod.data_ptr<float>();
  const float* A = at_.data_ptr<float>();
  const float* pb = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* ps = scaled ? pos_scale->data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  const std::vector<float> w1 = first_pass_weights(A, m, a, ps);
  const uint64_t pattern = output_pattern(A, m, a, ps);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(a * a * K, 1));
  const bool vec = has_tile_v(a) && m == a - 2;  // the vector form serves F(a - 2, 3)
  at::parallel_for(0, NT, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(vec ? 0 : m * a * K);  // the generic form's scratch
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = n0 + tile / T, ti = (tile % T) / tw, tj = tile % tw;
      const int64_t rows_in = std::min(m, Ho - ti * m), cols_in = std::min(m, Wo - tj * m);
      if (vec && output_tile_fast(a, pattern, pm + tile * st, sp, w1.data(), A, pb, K, rows_in,
                                  cols_in, po + ((n * Ho + ti * m) * Wo + tj * m) * K, Wo * K)) {
        continue;
      }
      for (int64_t r = 0; r < rows_in; ++r) {
        for (int64_t j = 0; j < a; ++j) {
          float* o = rows.data() + (r * a + j) * K;
          std::fill(o, o + K, 0.0f);
          add_weighted(o, K, w1.data() + (r * a + j) * a, a, pm + j * sp + tile * st, a * sp);
        }
        for (int64_t s2 = 0; s2 < cols_in; ++s2) {
          float* o = po + ((n * Ho + ti * m + r) * Wo + tj * m + s2) * K;
          if (has_bias) {
            std::copy_n(pb, K, o);
          } else {
            std::fill(o, o + K, 0.0f);
          }
          add_weighted(o, K, A + s2 * a, a, rows.data() + r * a * K, K);
        }
      }
    }
  });
}

// The deploy float32 Winograd-domain product, out[p] = v[p] @ w[p] for v (alpha^2, NT, C) and
// w (alpha^2, C, K): 8 tiles x 32 output channels in 16 AVX-512 registers, v's values broadcast
// from its rows, w's 32 columns copied to a contiguous panel of at most kPanelRows input
// channels (longer sums continue from the stored partial sums, in order). torch.bmm, which ran
// it, runs MKL's AVX2 code on AMD CPUs (about half of Zen 5's float rate), where oneDNN's direct
// convolution, the layer's rival, runs AVX-512. The same products, summed in another order
// than MKL's: equal up to float rounding. The AVX-512 build only (else at::bmm). Under 8 tiles
// (one image's 4x4 or 8x8 layer), f32_narrow_product: every weight read once, in registers.
#if defined(__AVX512F__)
namespace {

constexpr int64_t kPanelRows = 256;

void f32_rows_product(const float* A, int64_t M, int64_t C, const float* B, int64_t K, float* out,
                      int64_t j0, std::vector<float>& panel) {
  const __mmask16 m0 = lanes_left(K - j0), m1 = lanes_left(K - j0 - 16);
  panel.resize(kPanelRows * 32);
  for (int64_t c0 = 0; c0 < C; c0 += kPanelRows) {
    const int64_t kc = std::min(kPanelRows, C - c0);
    for (int64_t c = 0; c < kc; ++c) {
      const float* src = B + (c0 + c) * K + j0;
      _mm512_storeu_ps(panel.data() + c * 32, _mm512_maskz_loadu_ps(m0, src));
      _mm512_storeu_ps(panel.data() + c * 32 + 16, _mm512_maskz_loadu_ps(m1, src + 16));
    }
    for (int64_t i0 = 0; i0 < M; i0 += 8) {
      const float* rows[8];
      for (int i = 0; i < 8; ++i) rows[i] = A + std::min(i0 + i, M - 1) * C + c0;
      __m512 acc[8][2];
      for (int i = 0; i < 8; ++i) {
        if (c0 == 0 || i0 + i >= M) {
          acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        } else {  // the sums so far, from the first panels of input channels
          acc[i][0] = _mm512_maskz_loadu_ps(m0, out + (i0 + i) * K + j0);
          acc[i][1] = _mm512_maskz_loadu_ps(m1, out + (i0 + i) * K + j0 + 16);
        }
      }
      for (int64_t c = 0; c < kc; ++c) {
        const __m512 b0 = _mm512_loadu_ps(panel.data() + c * 32);
        const __m512 b1 = _mm512_loadu_ps(panel.data() + c * 32 + 16);
        for (int i = 0; i < 8; ++i) {
          const __m512 x = _mm512_set1_ps(rows[i][c]);
          acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
        }
      }
      for (int i = 0; i < 8 && i0 + i < M; ++i) {
        _mm512_mask_storeu_ps(out + (i0 + i) * K + j0, m0, acc[i][0]);
        _mm512_mask_storeu_ps(out + (i0 + i) * K + j0 + 16, m1, acc[i][1]);
      }
    }
  }
}

// Under 8 rows (tiles): one image's 4x4 layer at batch 1 is one tile, its 8x8 layer four, and
// the product reads each weight once: bound by reading w, not by arithmetic. M rows x 16 * NV
// columns of accumulators; w's rows read NV cache lines at a time, the lines kAheadRows rows on
// prefetched (the rows lie K floats apart: a stride the hardware's prefetchers follow late).
// Each output is summed over c in increasing order, as f32_rows_product sums it.
constexpr int64_t kAheadRows = 8;

template <int M, int NV>
void f32_narrow_block(const float* A, int64_t C, const float* B, int64_t K, float* out,
                      int64_t j0) {
  // (the unroll pragmas keep acc in registers: without them GCC kept it on the stack for M > 1,
  // and the product ran at 2.3x the time)
  __mmask16 mask[NV];
  __m512 acc[M][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    mask[v] = lanes_left(K - j0 - 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* row = B + c * K + j0;
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (c + kAheadRows < C)
        _mm_prefetch(reinterpret_cast<const char*>(row + kAheadRows * K + 16 * v), _MM_HINT_T0);
      b[v] = _mm512_maskz_loadu_ps(mask[v], row + 16 * v);
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 x = _mm512_set1_ps(A[i * C + c]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(x, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(out + i * K + j0 + 16 * v, mask[v], acc[i][v]);
}

// Columns per work item of the narrow product: 8 vectors for up to 3 rows, 4 for 4 to 7
// (at most 28 accumulators).
constexpr int64_t narrow_columns(int64_t M) { return M <= 3 ? 128 : 64; }

template <int M>
void f32_narrow_rows(const float* A, int64_t C, const float* B, int64_t K, float* out,
                     int64_t j0) {
  if constexpr (M <= 3)
    f32_narrow_block<M, 8>(A, C, B, K, out, j0);
  else
    f32_narrow_block<M, 4>(A, C, B, K, out, j0);
}

void f32_narrow_product(const float* A, int64_t M, int64_t C, const float* B, int64_t K,
                        float* out, int64_t j0) {
  switch (M) {
    case 1: return f32_narrow_rows<1>(A, C, B, K, out, j0);
    case 2: return f32_narrow_rows<2>(A, C, B, K, out, j0);
    case 3: return f32_narrow_rows<3>(A, C, B, K, out, j0);
    case 4: return f32_narrow_rows<4>(A, C, B, K, out, j0);
    case 5: return f32_narrow_rows<5>(A, C, B, K, out, j0);
    case 6: return f32_narrow_rows<6>(A, C, B, K, out, j0);
    default: return f32_narrow_rows<7>(A, C, B, K, out, j0);
  }
}

}  // namespace
#endif

at::Tensor f32_bmm(const at::Tensor& v, const at::Tensor& w) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 3 &&
                  w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 3 &&
                  v.size(0) == w.size(0) && v.size(2) == w.size(1),
              "v (alpha^2, NT, C) and w (alpha^2, C, K) must be float32 CPU tensors");
#if defined(__AVX512F__)
  const at::Tensor vc = v.contiguous(), wc = w.contiguous();
  const int64_t a2 = vc.size(0), M = vc.size(1), C = vc.size(2), K = wc.size(2);
  at::Tensor out = at::empty({a2, M, K}, vc.options());
  if (M == 0 || K == 0) return out;
  if (C == 0) return out.zero_();
  const float* pv = vc.data_ptr<float>();
  const float* pw = wc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  if (M < 8) {  // one image's 4x4 or 8x8 layer: bound by reading w (f32_narrow_product)
    const int64_t cols = narrow_columns(M), nj = (K + cols - 1) / cols;
    at::parallel_for(0, a2 * nj, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t p = item / nj, j0 = (item % nj) * cols;
        f32_narrow_product(pv + p * M * C, M, C, pw + p * C * K, K, po + p * M * K, j0);
      }
    });
    return out;
  }
  const int64_t nj = (K + 31) / 32;
  at::parallel_for(0, a2 * nj, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / nj, j0 = (item % nj) * 32;
      f32_rows_product(pv + p * M * C, M, C, pw + p * C * K, K, po + p * M * K, j0, panel);
    }
  });
  return out;
#else
  return at::bmm(v, w);
#endif
}

// The float32 Winograd layer in one call: for each group of chunk_images images,
// winograd_input, the Winograd-domain product with u_t (alpha^2, C, K) (f32_bmm),
// and winograd_output with the bias (undefined: none); returns out (N, H, W, K). What the
// Python loop of deploy_kernels.winograd_deploy_conv2d calls, from C++ (see below).
at::Tensor winograd_f32_conv(const at::Tensor& x, const at::Tensor& bt, const at::Tensor& at_,
                             const at::Tensor& u_t, const std::optional<at::Tensor>& bias,
                             int64_t chunk_images) {
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C)");
  TORCH_CHECK(at_.dim() == 2 && at_.size(0) >= 1, "A_t must be a matrix");
  TORCH_CHECK(u_t.dim() == 3 && u_t.scalar_type() == at::kFloat, "u_t must be (alpha^2, C, K)");
  TORCH_CHECK(chunk_images >= 1, "chunk_images must be at least 1");
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), m = at_.size(0), K = u_t.size(2);
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m;
  at::Tensor out = at::empty({N, H, W, K}, x.options());
  const at::Tensor no_bias;
  for (int64_t n0 = 0; n0 < N; n0 += chunk_images) {
    const int64_t nb = std::min(chunk_images, N - n0);
    const at::Tensor v = winograd_input(x, bt, m, th, tw, n0, nb);
    const at::Tensor mp = f32_bmm(v, u_t);
    winograd_output(mp, at_, bias.has_value() ? *bias : no_bias, out, th, tw, n0, std::nullopt);
  }
  return out;
}

// The 8-bit Winograd layer on the VNNI path in one call: for each group of chunk_images images,
// winograd_input_q8 (position-major, channels padded as wpack says), q8_product and
// winograd_output with the positions' scales and the bias (undefined: none); returns out
// (N, H, W, K). One call from Python where the three and their allocations were each one: at
// batch 1 a layer is some tens of microseconds, and the interpreter's and dispatcher's share of
// it grew where the layer ran among others (its code paths cold): 0.05 ms alone, 0.15 ms in a
// network of direct convolutions.
//
// fuse_product: where the packed weights of all positions fit in kFuseWeightBytes (they are
// then read from cache once per block of tiles: 3 MiB, tuned on a Zen 4 with 1 MiB of L2 and
// 32 MiB of L3 per core complex, where 1 MiB left the 36 x 128 x 256 layers unfused at 1.16x
// of oneDNN's direct convolution, 0.84x fused), the whole layer runs per block of tiles of the
// batch (chunk_images is then unused): the block's input tiles transformed and quantized into
// a buffer, its product's int32 sums dequantized into another, both staying in cache, and
// transformed to the output from there; neither the quantized input (alpha^2 x tiles x C
// bytes) nor the product (alpha^2 x tiles x K floats) is written to memory and read back. The
// same operations on the same values: the output is the unfused form's bit for bit. (With the
// input transform in the block too, Zen 5, 1 thread, batch 32: 64 -> 64 channels at 32x32
// 4.95 -> 4.32 ms, 128 -> 128 at 16x16 2.87 -> 2.10 ms; the quantized input of a group of
// images had rows 16 KiB apart, 36 of them in one set of the L1 cache.)
constexpr int64_t kFuseWeightBytes = 3 << 20;
constexpr int64_t kFuseBufferBytes = 256 << 10;

at::Tensor winograd_q8_conv(const at::Tensor& x, const at::Tensor& bt, const at::Tensor& at_,
                            const at::Tensor& inv_scale, const at::Tensor& pos_scale,
                            const at::Tensor& wpack, const at::Tensor& wsum,
                            const at::Tensor& wscale, int64_t K,
                            const std::optional<at::Tensor>& bias, int64_t chunk_images,
                            bool fuse_product) {
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C)");
  TORCH_CHECK(at_.dim() == 2 && at_.size(0) >= 1 && at_.scalar_type() == at::kFloat &&
                  at_.is_contiguous(),
              "A_t must be a contiguous float32 matrix");
  TORCH_CHECK(wpack.dim() == 5, "wpack must be (alpha^2, K16 / 16, Cs / 4, 16, 4)");
  TORCH_CHECK(chunk_images >= 1, "chunk_images must be at least 1");
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), m = at_.size(0), a = at_.size(1);
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, Cs = wpack.size(2) * 4;
  const int64_t a2 = a * a, Kb = wpack.size(1), T = th * tw;
  at::Tensor out = at::empty({N, H, W, K}, x.options());
  const at::Tensor no_bias;
  const bool fuse = fuse_product && has_tile_v(a) && m == a - 2 &&
                    a2 * Cs * Kb * 16 <= kFuseWeightBytes;
  if (!fuse) {
    for (int64_t n0 = 0; n0 < N; n0 += chunk_images) {
      const int64_t nb = std::min(chunk_images, N - n0);
      const at::Tensor q = winograd_input_q8(x, bt, m, th, tw, n0, nb, inv_scale, 128, Cs, true);
      const at::Tensor mp = q8_product(q, wpack, wsum, wscale, K, 128);
      winograd_output(mp, at_, bias.has_value() ? *bias : no_bias, out, th, tw, n0, pos_scale);
    }
    return out;
  }
#if defined(__AVX512F__)
  TORCH_CHECK(q8_product_supported(), "the fused product needs a CPU with VNNI");
  check_q8_weights(wpack, wsum, wscale, a2, Cs, K);
  check_position_scales(pos_scale, a2, "pos_scale");
  const bool has_bias = bias.has_value() && bias->defined() && bias->numel() > 0;
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->numel() == K &&
                            bias->is_contiguous()),
              "bias must be K contiguous float32 values");
  const float* A = at_.data_ptr<float>();
  const float* psc_pos = pos_scale.data_ptr<float>();
  const std::vector<float> w1 = first_pass_weights(A, m, a, psc_pos);
  const uint64_t out_pattern = output_pattern(A, m, a, psc_pos);
  const int8_t* pw = wpack.data_ptr<int8_t>();
  const int32_t* ps = wsum.data_ptr<int32_t>();
  const float* psc = wscale.data_ptr<float>();
  const float* pb = has_bias ? bias->data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  const float* B = bt.data_ptr<float>();
  const float* inv = inv_scale.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const int64_t C = x.size(3);
  check_position_scales(inv_scale, a2, "inv_scale");
  TORCH_CHECK(Cs >= C, "wpack's input channels must be at least x's");
  check_input(x, bt);
  TORCH_CHECK(bt.size(0) == a, "B_t and A_t must be of one tile size");
  // tiles per block: a multiple of kTB whose product buffer stays within kFuseBufferBytes,
  // and, where the batch is small, at least 4 blocks per thread while blocks of kTB allow it
  const int64_t NT = N * T;
  const int64_t fit = kFuseBufferBytes / (a2 * K * static_cast<int64_t>(sizeof(float)));
  int64_t tb2 = std::max<int64_t>(kTB, std::min<int64_t>(48, fit / kTB * kTB));
  const int64_t share = NT / (4 * std::max<int64_t>(1, at::get_num_threads()));
  tb2 = std::max<int64_t>(kTB, std::min<int64_t>(tb2, share / kTB * kTB));
  const int64_t nblk = (NT + tb2 - 1) / tb2;
  const uint64_t pattern = nonzero_pattern(B, a * a);
  const bool prefetch = worth_prefetching(x);
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    // the channels past C hold the zero point; the input transform writes the first C only
    std::vector<uint8_t> qbuf(a2 * tb2 * Cs, uint8_t{128});
    std::vector<float> buf(a2 * tb2 * K);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * tb2, t1 = std::min(NT, t0 + tb2);
      for (int64_t tile = t0; tile < t1; ++tile) {  // the block's quantized input tiles
        const int64_t n = tile / T, ti = (tile % T) / tw, tj = tile % tw;
        uint8_t* o = qbuf.data() + (tile - t0) * Cs;
        input_tile_fast<true>(a, pattern, px, B, H, W, C, m, n, ti, tj, o, tb2 * Cs, inv,
                              128.0f, prefetch);
      }
      for (int64_t p = 0; p < a2; ++p)
        q8_position(qbuf.data(), pw, ps, psc, buf.data(), p, 0, t1 - t0, tb2, Cs, K, Kb, 128,
                    tb2 * K, 0);
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n = tile / T, ti = (tile % T) / tw, tj = tile % tw;
        const int64_t rows_in = std::min(m, H - ti * m), cols_in = std::min(m, W - tj * m);
        output_tile_fast(a, out_pattern, buf.data() + (tile - t0) * K, tb2 * K, w1.data(), A, pb,
                         K, rows_in, cols_in, po + ((n * H + ti * m) * W + tj * m) * K, W * K);
      }
    }
  });
#endif
  return out;
}

// ---- The training layer's 2-D transforms: mat X mat^T of every tile, tiles position-major ----
//
// tiles (a*a, count): row i*a+j holds element (i, j) of every tile; out (p*p, count). The torch
// form computes it as two GEMMs (mat along the tiles' rows, then along their columns) with an
// intermediate as large as the tiles; here kV tiles at a time are held in vector registers and
// a small stack buffer: one pass over memory. Every output is the same sum as the GEMMs' up to
// float rounding, in a fixed order (increasing i, then j).
//
// The backward is one pass too: the tiles' gradient mat^T G mat and, for a learned mat, its
// gradient (column pass: sum_r G[r] rows[r]^T; row pass: d rows X^T), accumulated per chunk of
// kTileChunk tiles in kV lanes, the lanes then added in order, and the chunks summed in double
// in order: the same result for any number of threads.

namespace {

// Tiles per vector: one register's worth of floats (the blocks below are straight-line code of
// some thousand vector operations; twice the width on AVX2 doubles the code and the build time).
#if defined(__AVX512F__)
constexpr int64_t kV = 16;
#else
constexpr int64_t kV = 8;
#endif
constexpr int64_t kTileChunk = 512;  // tiles per unit of parallel work and of partial sums
constexpr int64_t kMaxAlpha = 8;
typedef float vf __attribute__((vector_size(kV * sizeof(float))));
typedef int8_t v8 __attribute__((vector_size(kV)));
typedef int16_t v16 __attribute__((vector_size(kV * sizeof(int16_t))));

// kV values from p, or the first n of them and zeros.
inline vf load_n(const float* p, int64_t n) {
  vf v = {};
  if (n >= kV) {
    __builtin_memcpy(&v, p, sizeof v);
  } else {
    for (int64_t k = 0; k < n; ++k) v[k] = p[k];
  }
  return v;
}

inline void store_n(float* p, vf v, int64_t n) {
  if (n >= kV) {
    __builtin_memcpy(p, &v, sizeof v);
  } else {
    for (int64_t k = 0; k < n; ++k) p[k] = v[k];
  }
}

// Both this and Untile (below) number their tiles so: column ((ch * N + n) * th + ti) * tw + tj
// of image n, channel ch of an N x C x H x W tensor. Per lane of the block from c0, the offset of
// the tile's first pixel (at row ti*m + origin, column tj*m + origin, which may lie outside the
// image), and that row and column.
inline void tile_lanes(int64_t c0, int64_t nl, int64_t n, int64_t c, int64_t h, int64_t w,
                       int64_t th, int64_t tw, int64_t m, int64_t origin, int64_t* off,
                       int64_t* y0, int64_t* x0) {
  for (int64_t l = 0; l < nl; ++l) {
    const int64_t col = c0 + l, tj = col % tw, rest = col / tw, ti = rest % th;
    const int64_t plane = rest / th, ch = plane / n, img = plane % n;
    y0[l] = ti * m + origin;
    x0[l] = tj * m + origin;
    off[l] = ((img * c + ch) * h + y0[l]) * w + x0[l];
  }
}

// A block's lanes as int32 vectors, for the gathers and scatters below: each lane's first-pixel
// offset from `base` (the lowest offset, or 0 if that is negative), its row and its column in
// an h x w plane; lanes from n on get a row far above any image, so that every bounds test
// fails for them.
typedef int32_t vi __attribute__((vector_size(kV * sizeof(int32_t))));

struct LaneVecs {
  int64_t base = 0;
  int32_t h = 0, w = 0;
  vi off = {}, y0 = {}, x0 = {};

  // Element (i, j) of every lane's window or tile: its index from base, and whether it lies
  // inside the plane.
  vi index(int32_t i, int32_t j) const { return off + (i * w + j); }
  vi inside(int32_t i, int32_t j) const {
    const vi r = y0 + i, c = x0 + j;
    return (r >= 0) & (r < h) & (c >= 0) & (c < w);
  }
};

// False when the block's offsets, plus a window's extent (rows of `w` values), or the plane do
// not fit in int32: the callers then go lane by lane.
inline bool lane_vecs(const int64_t* off, const int64_t* y0, const int64_t* x0, int64_t n,
                      int64_t h, int64_t w, LaneVecs& v) {
  int64_t lo = off[0], hi = off[0];
  for (int64_t l = 1; l < n; ++l) {
    lo = std::min(lo, off[l]);
    hi = std::max(hi, off[l]);
  }
  v.base = std::max<int64_t>(lo, 0);
  constexpr int64_t limit = int64_t{1} << 31;
  if (h >= limit || hi - v.base + (kMaxAlpha + 1) * (w + 1) >= limit) return false;
  v.h = static_cast<int32_t>(h);
  v.w = static_cast<int32_t>(w);
  for (int64_t l = 0; l < kV; ++l) {
    const bool live = l < n;
    v.off[l] = live ? static_cast<int32_t>(off[l] - v.base) : 0;
    v.y0[l] = live ? static_cast<int32_t>(y0[l]) : -(1 << 29);
    v.x0[l] = live ? static_cast<int32_t>(x0[l]) : 0;
  }
  return true;
}

// The 32-bit words at p + 4 * idx[l] for the lanes where ok[l] is set (all bits), 0 in the
// others (not read): one masked gather instruction where the ISA has one.
inline vi gather_words(const void* p, vi idx, vi ok) {
#if defined(__AVX512F__)
  const __mmask16 k = _mm512_test_epi32_mask((__m512i)ok, (__m512i)ok);
  return (vi)_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, (__m512i)idx, p, 4);
#elif defined(__AVX2__)
  return (vi)_mm256_mask_i32gather_epi32(_mm256_setzero_si256(),
                                         static_cast<const int*>(p), (__m256i)idx,
                                         (__m256i)ok, 4);
#else
  vi q = {};
  for (int64_t l = 0; l < kV; ++l) {
    if (ok[l]) __builtin_memcpy(&q[l], static_cast<const char*>(p) + 4 * int64_t{idx[l]}, 4);
  }
  return q;
#endif
}

// p[idx[l]] where ok[l], +0.0 elsewhere: the floats' bits, gathered as words.
inline vf gather(const float* p, vi idx, vi ok) { return (vf)gather_words(p, idx, ok); }

// Integer levels p[idx[l]] (int8 or int16) as floats where ok, 0 elsewhere. There is no 8- or
// 16-bit gather: each lane reads the aligned 32-bit word that holds its level (an aligned word
// lies within one page, the level's own, so no read can fault) and shifts the level out,
// sign-extended (little-endian byte order).
template <typename L>
inline vf gather_levels(const L* p, vi idx, vi ok) {
  static_assert(sizeof(L) == 1 || sizeof(L) == 2, "int8 or int16 levels");
  typedef uint32_t vu __attribute__((vector_size(kV * sizeof(uint32_t))));
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  const int32_t mis = static_cast<int32_t>(addr & 3);
  const vi bytes = idx * static_cast<int32_t>(sizeof(L)) + mis;  // from the aligned base
  const vi words = gather_words(reinterpret_cast<const void*>(addr - mis), bytes >> 2, ok);
  constexpr int32_t top = (4 - static_cast<int32_t>(sizeof(L))) * 8;
  const vu up = (vu)words << (vu)(top - (bytes & 3) * 8);  // the level in the top bits
  return __builtin_convertvector((vi)up >> top, vf);         // arithmetic: sign-extended
}

// p[idx[l]] = v[l] where ok[l]; the lanes' indices are distinct.
inline void scatter(float* p, vi idx, vi ok, vf v) {
#if defined(__AVX512F__)
  const __mmask16 k = _mm512_test_epi32_mask((__m512i)ok, (__m512i)ok);
  _mm512_mask_i32scatter_ps(p, k, (__m512i)idx, (__m512)v, 4);
#else
  for (int64_t l = 0; l < kV; ++l) {
    if (ok[l]) p[idx[l]] = v[l];
  }
#endif
}

// The layer's input as its tiles, read in place (the gather fused into B^T): x is N x C x H x W;
// tile column c = ((ch * N + n) * th + ti) * tw + tj (gather_tiles' order) holds the a x a
// window at rows ti*m - 1 .., columns tj*m - 1 .., zeros outside the image (the conv's padding
// of 1 and, bottom/right, whole tiles). m == 0: the tiles are a (a*a, count) tensor instead.
struct Window {
  int64_t n = 0, c = 0, h = 0, w = 0, th = 0, tw = 0, m = 0, a = 0;

  int64_t tiles_per_plane() const { return th * tw; }

  // The windows start one pixel up and left of their tiles (the conv's padding).
  void lanes(int64_t c0, int64_t nl, int64_t* off, int64_t* y0, int64_t* x0) const {
    tile_lanes(c0, nl, n, c, h, w, th, tw, m, -1, off, y0, x0);
  }
};

// The tiles' values for kV tiles from c0 (n of them valid): from the float32 tensor, or integer
// levels times their scale (one, or one per row); with win.m, windows of x read in place (one
// scale).
struct TileRows {
  const float* values = nullptr;
  const int8_t* l8 = nullptr;
  const int16_t* l16 = nullptr;
  const float* scale = nullptr;
  int64_t scales = 1, rows = 0, count = 0;
  Window win;

  // Element e of x (float32, or levels times the scale).
  float at(int64_t e) const {
    if (values) return values[e];
    return static_cast<float>(l8 ? l8[e] : l16[e]) * scale[0];
  }

  vf load(int64_t r, int64_t c0, int64_t n) const {
    if (values) return load_n(values + r * count + c0, n);
    const float s = scale[scales == 1 ? 0 : r];
    if (n >= kV) {  // a whole vector: converted lane by lane in registers (exact), then scaled
      if (l8) {
        v8 b;
        __builtin_memcpy(&b, l8 + r * count + c0, sizeof b);
        return __builtin_convertvector(b, vf) * s;
      }
      v16 b;
      __builtin_memcpy(&b, l16 + r * count + c0, sizeof b);
      return __builtin_convertvector(b, vf) * s;
    }
    float buf[kV] = {};
    if (l8) {
      const int8_t* src = l8 + r * count + c0;
      for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(src[k]) * s;
    } else {
      const int16_t* src = l16 + r * count + c0;
      for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(src[k]) * s;
    }
    return load_n(buf, kV);
  }
};

inline bool stream_rows(const float* base, int rows, int64_t count, int64_t c0, int64_t n) {
#if defined(__AVX512F__)
  return n >= kV && rows * count * int64_t{sizeof(float)} >= kLargeRows && (count & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(base + c0) & 63) == 0;
#else
  return false;
#endif
}


// Rows [0, rows) of kV tiles from c0 into v, and back: one out-of-line copy shared by every
// shape, so that the templates below hold only arithmetic.
__attribute__((noinline)) void load_block(const TileRows& x, int rows, int64_t c0, int64_t n,
                                          vf* v) {
  if (x.win.m) {
    const Window& g = x.win;
    int64_t off[kV], y0[kV], x0[kV];
    g.lanes(c0, n, off, y0, x0);
    LaneVecs lv;
    if (lane_vecs(off, y0, x0, n, g.h, g.w, lv)) {  // element (i, j) of every lane in one gather
      const float s = x.values ? 1.0f : x.scale[0];
      for (int32_t i = 0; i < g.a; ++i) {
        for (int32_t j = 0; j < g.a; ++j) {
          const vi ok = lv.inside(i, j);
          const vi idx = lv.index(i, j);
          vf q;
          if (x.values) {
            q = gather(x.values + lv.base, idx, ok);
          } else {  // level * scale, as TileRows::at; +0 outside the image
            q = x.l8 ? gather_levels(x.l8 + lv.base, idx, ok)
                     : gather_levels(x.l16 + lv.base, idx, ok);
            q = ok ? q * s : vf{};
          }
          v[i * g.a + j] = q;
        }
      }
      return;
    }
    for (int64_t i = 0; i < g.a; ++i) {
      for (int64_t j = 0; j < g.a; ++j) {
        vf q = {};
        for (int64_t l = 0; l < n; ++l) {
          const int64_t r = y0[l] + i, s = x0[l] + j;
          if (r >= 0 && r < g.h && s >= 0 && s < g.w) q[l] = x.at(off[l] + i * g.w + j);
        }
        v[i * g.a + j] = q;
      }
    }
    return;
  }
#if defined(__AVX512F__)
  if (x.values && rows * x.count * int64_t{sizeof(float)} >= kLargeRows) {
    // The same rows read: each row's line four blocks ahead asked for now (the hardware's
    // stream prefetchers do not follow 36 streams a power of two apart).
    for (int q = 0; q < rows; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(x.values + q * x.count + c0 + 4 * kV),
                   _MM_HINT_T0);
    }
  }
#endif
  for (int q = 0; q < rows; ++q) v[q] = x.load(q, c0, n);
}

// The tiles' gradient from the block at c0 added into x's (N x C x H x W, zero where no window
// has added yet), lane by lane in order: the sum over the windows that cover a pixel, in
// increasing tile order.
#if defined(__AVX512F__)
// scatter_block for windows of F2 and F4 (a = m + 2, m = 2 or 4) in vector registers, a run of
// lanes at a time (consecutive tiles of one tile row) and one pixel row of their windows at a
// time. A tile's window columns j < m ("own") fall on its m pixels, columns m and m + 1
// ("spill") on the first two of the next tile's: the pixel row gets the run's spill, then its
// own values. Each pixel so receives its values in increasing tile order (the spill of tile
// t - 1 before the own value of tile t; earlier rows of tiles in earlier runs), the scalar
// loop's order: the same sums bit for bit. Measured on Zen 5 (1 thread, batch 32, d x only): F2
// on 32 channels at 32x32 5.7 -> 3.5 ms, F4 2.7 -> 2.1 ms; 8x8 images at F2 1.4 -> 1.1 ms.
void scatter_runs_v(float* gx, const Window& g, int64_t n, const int64_t* off, const int64_t* y0,
                    const int64_t* x0, const vf* v) {
  const int64_t m = g.m, a = g.a;
  const __m512i k16 = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t l = 0;
  while (l < n) {
    int64_t r = l + 1;
    // the run: the same row of the same plane (offsets and columns advance alike)
    while (r < n && y0[r] == y0[l] && x0[r] - x0[l] == (r - l) * m &&
           off[r] - off[l] == (r - l) * m) {
      ++r;
    }
    const int64_t R = r - l, span = (R + 1) * m;
    for (int64_t i = 0; i < a; ++i) {
      const int64_t y = y0[l] + i;
      if (y < 0 || y >= g.h) continue;
      float* row = gx + off[l] + i * g.w;  // pixel x0[l] of row y
      const __m512* vi = reinterpret_cast<const __m512*>(v + i * a);
      for (int64_t c = 0; c * 16 < span; ++c) {
        const __m512i k = _mm512_add_epi32(k16, _mm512_set1_epi32(static_cast<int32_t>(c * 16)));
        // tile (lane offset) and column of each position k: k / m, k % m (m a power of two)
        const int32_t shift = m == 2 ? 1 : 2;
        const __m512i t = _mm512_srli_epi32(k, shift);
        const __m512i col = _mm512_and_si512(k, _mm512_set1_epi32(static_cast<int32_t>(m - 1)));
        const __m512i x = _mm512_add_epi32(k, _mm512_set1_epi32(static_cast<int32_t>(x0[l])));
        const __mmask16 inside =
            _mm512_cmpge_epi32_mask(x, _mm512_setzero_si512()) &
            _mm512_cmplt_epi32_mask(x, _mm512_set1_epi32(static_cast<int32_t>(g.w)));
        const __mmask16 own_k =
            _mm512_cmplt_epi32_mask(k, _mm512_set1_epi32(static_cast<int32_t>(R * m))) & inside;
        const __mmask16 spill_k =
            _mm512_cmpge_epi32_mask(k, _mm512_set1_epi32(static_cast<int32_t>(m))) &
            _mm512_cmplt_epi32_mask(k, _mm512_set1_epi32(static_cast<int32_t>(span))) &
            _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(2)) & inside;
        if (!(own_k | spill_k)) continue;
        // lane l + t of column col: columns 0, 1 (and m + 0, m + 1 for the spill) from one
        // pair of registers, 2 and 3 (F4's own) from the next
        const __m512i lane = _mm512_add_epi32(t, _mm512_set1_epi32(static_cast<int32_t>(l)));
        const __m512i pick = _mm512_add_epi32(
            lane, _mm512_slli_epi32(_mm512_and_si512(col, _mm512_set1_epi32(1)), 4));
        __m512 own = _mm512_permutex2var_ps(vi[0], pick, vi[1]);
        if (m == 4) {
          const __m512 hi = _mm512_permutex2var_ps(vi[2], pick, vi[3]);
          own = _mm512_mask_mov_ps(own, _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(2)), hi);
        }
        const __m512i prev = _mm512_sub_epi32(pick, _mm512_set1_epi32(1));  // lane l + t - 1
        const __m512 spill = _mm512_permutex2var_ps(vi[m], prev, vi[m + 1]);
        float* p = row + c * 16;
        __m512 d = _mm512_maskz_loadu_ps(own_k | spill_k, p);
        d = _mm512_mask_add_ps(d, spill_k, d, spill);
        d = _mm512_mask_add_ps(d, own_k, d, own);
        _mm512_mask_storeu_ps(p, own_k | spill_k, d);
      }
    }
    l = r;
  }
}
#endif

__attribute__((noinline)) void scatter_block(float* gx, const Window& g, int64_t c0, int64_t n,
                                             const vf* v) {
  int64_t off[kV], y0[kV], x0[kV];
  g.lanes(c0, n, off, y0, x0);
#if defined(__AVX512F__)
  // (for runs of 4 tiles and more: shorter rows of tiles ran as fast or faster lane by lane)
  if ((g.m == 2 || g.m == 4) && g.a == g.m + 2 && g.tw >= 4 && g.w < (int64_t{1} << 30)) {
    scatter_runs_v(gx, g, n, off, y0, x0, v);
    return;
  }
#endif
  for (int64_t l = 0; l < n; ++l) {  // the window's rows and columns inside the image
    const int64_t i0 = std::max<int64_t>(0, -y0[l]), i1 = std::min(g.a, g.h - y0[l]);
    const int64_t j0 = std::max<int64_t>(0, -x0[l]), j1 = std::min(g.a, g.w - x0[l]);
    for (int64_t i = i0; i < i1; ++i) {
      float* dst = gx + off[l] + i * g.w;
      const vf* src = v + i * g.a;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j][l];
    }
  }
}

// mask * v for rows [0, rows) of kV tiles from c0 (n valid; the others 0): the straight-through
// gradient of a clipping quantizer (int8 0/1 mask, float products as masked_grad makes them).
__attribute__((noinline)) void mask_block(const int8_t* mask, int rows, int64_t count,
                                          int64_t c0, int64_t n, vf* v) {
  for (int q = 0; q < rows; ++q) {
    v8 b = {};
    const int8_t* src = mask + q * count + c0;
    if (n >= kV) {
      __builtin_memcpy(&b, src, sizeof b);
    } else {
      for (int64_t k = 0; k < n; ++k) b[k] = src[k];
    }
    v[q] = __builtin_convertvector(b, vf) * v[q];
  }
}

__attribute__((noinline)) void store_block(float* base, int rows, int64_t count, int64_t c0,
                                           int64_t n, const vf* v) {
#if defined(__AVX512F__)
  if (stream_rows(base, rows, count, c0, n)) {
    for (int q = 0; q < rows; ++q) _mm512_stream_ps(base + q * count + c0, (__m512)v[q]);
    return;
  }
#endif
  for (int q = 0; q < rows; ++q) store_n(base + q * count + c0, v[q], n);
}

// The layer's output as an N x K x H x W tensor instead of position-major (p = m): tile column
// c = ((k * N + n) * th + ti) * tw + tj holds output pixels (ti*m + r, tj*m + s), those inside
// H x W (the last tiles may overhang; their extra outputs are dropped, their gradient is 0).
struct Untile {
  int64_t n = 0, k = 0, h = 0, w = 0, th = 0, tw = 0, m = 0;  // m == 0: position-major

  // Output channels k in place of tile_lanes' input channels.
  void lanes(int64_t c0, int64_t nl, int64_t* off, int64_t* y0, int64_t* x0) const {
    tile_lanes(c0, nl, n, k, h, w, th, tw, m, 0, off, y0, x0);
  }
};

__attribute__((noinline)) void store_untiled(float* y, const Untile& u, int64_t c0, int64_t n,
                                             const vf* v) {
  int64_t off[kV], y0[kV], x0[kV];
  u.lanes(c0, n, off, y0, x0);
  LaneVecs lv;
  if (lane_vecs(off, y0, x0, n, u.h, u.w, lv)) {  // output (r, s) of every lane in one scatter
    for (int32_t r = 0; r < u.m; ++r) {
      for (int32_t s = 0; s < u.m; ++s) {
        scatter(y + lv.base, lv.index(r, s), lv.inside(r, s), v[r * u.m + s]);
      }
    }
    return;
  }
  for (int64_t r = 0; r < u.m; ++r) {
    for (int64_t s = 0; s < u.m; ++s) {
      const vf q = v[r * u.m + s];
      for (int64_t l = 0; l < n; ++l) {
        if (y0[l] + r < u.h && x0[l] + s < u.w) y[off[l] + r * u.w + s] = q[l];
      }
    }
  }
}

__attribute__((noinline)) void load_untiled(const float* y, const Untile& u, int64_t c0,
                                            int64_t n, vf* v) {
  int64_t off[kV], y0[kV], x0[kV];
  u.lanes(c0, n, off, y0, x0);
  LaneVecs lv;
  if (lane_vecs(off, y0, x0, n, u.h, u.w, lv)) {
    for (int32_t r = 0; r < u.m; ++r) {
      for (int32_t s = 0; s < u.m; ++s) {
        v[r * u.m + s] = gather(y + lv.base, lv.index(r, s), lv.inside(r, s));
      }
    }
    return;
  }
  for (int64_t r = 0; r < u.m; ++r) {
    for (int64_t s = 0; s < u.m; ++s) {
      vf q = {};
      for (int64_t l = 0; l < n; ++l) {
        if (y0[l] + r < u.h && x0[l] + s < u.w) q[l] = y[off[l] + r * u.w + s];
      }
      v[r * u.m + s] = q;
    }
  }
}

// Zeros over the planes (N x C images of H x W) whose tiles are columns [c0, c1) of g: whole
// planes, as the backward's chunks are when it scatters.
__attribute__((noinline)) void zero_planes(float* gx, const Window& g, int64_t c0, int64_t c1) {
  const int64_t t = g.tiles_per_plane();
  for (int64_t plane = c0 / t; plane < (c1 + t - 1) / t; ++plane) {
    const int64_t ch = plane / g.n, img = plane % g.n;
    float* dst = gx + (img * g.c + ch) * g.h * g.w;
    std::fill(dst, dst + g.h * g.w, 0.0f);
  }
}

Untile untile_of(const std::vector<int64_t>& g, int64_t p, int64_t count) {
  Untile u;
  if (g.empty()) return u;
  TORCH_CHECK(g.size() == 6, "untile must be (N, K, H, W, th, tw)");
  u.n = g[0], u.k = g[1], u.h = g[2], u.w = g[3], u.th = g[4], u.tw = g[5], u.m = p;
  TORCH_CHECK(u.n > 0 && u.k > 0 && u.h > 0 && u.w > 0 && u.th * p >= u.h && u.tw * p >= u.w &&
                  u.n * u.k * u.th * u.tw == count,
              "untile geometry does not match the tiles");
  return u;
}

TileRows tile_rows(const at::Tensor& tiles, const at::Tensor& scale) {
  TORCH_CHECK(tiles.device().is_cpu() && tiles.is_contiguous() && tiles.dim() == 2,
              "tiles must be a contiguous 2-D CPU tensor");
  TileRows t;
  t.rows = tiles.size(0);
  t.count = tiles.size(1);
  if (tiles.scalar_type() == at::kFloat) {
    t.values = tiles.data_ptr<float>();
    return t;
  }
  TORCH_CHECK(tiles.scalar_type() == at::kChar || tiles.scalar_type() == at::kShort,
              "tiles must be float32, or int8 / int16 levels with their scale");
  TORCH_CHECK(scale.defined() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == t.rows),
              "scale must be one float32 value or one per row of the levels");
  t.scale = scale.data_ptr<float>();
  t.scales = scale.numel();
  if (tiles.scalar_type() == at::kChar) {
    t.l8 = tiles.data_ptr<int8_t>();
  } else {
    t.l16 = tiles.data_ptr<int16_t>();
  }
  return t;
}

// Windows of x (N x C x H x W: float32, or int8 / int16 levels with one float32 scale) as the
// tiles of geometry g = (N, C, H, W, th, tw) for an a x a transform (m = a - 2).
Window window_of(const std::vector<int64_t>& g, int64_t a) {
  TORCH_CHECK(g.size() == 6, "window must be (N, C, H, W, th, tw)");
  const int64_t m = a - 2;
  TORCH_CHECK(m > 0 && g[0] > 0 && g[1] > 0 && g[2] > 0 && g[3] > 0 && g[4] * m >= g[2] &&
                  g[5] * m >= g[3] && (g[4] - 1) * m < g[2] && (g[5] - 1) * m < g[3],
              "window: th x tw tiles of m x m must just cover H x W");
  Window w;
  w.n = g[0], w.c = g[1], w.h = g[2], w.w = g[3], w.th = g[4], w.tw = g[5], w.m = m, w.a = a;
  return w;
}

TileRows window_rows(const at::Tensor& x, const at::Tensor& scale,
                     const std::vector<int64_t>& g, int64_t a) {
  TileRows t;
  t.win = window_of(g, a);
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 4 && x.size(0) == g[0] &&
                  x.size(1) == g[1] && x.size(2) == g[2] && x.size(3) == g[3],
              "x must be a contiguous N x C x H x W CPU tensor as window says");
  t.rows = a * a;
  t.count = g[0] * g[1] * g[4] * g[5];
  if (x.scalar_type() == at::kFloat) {
    t.values = x.data_ptr<float>();
    return t;
  }
  TORCH_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kShort,
              "x must be float32, or int8 / int16 levels with their scale");
  TORCH_CHECK(scale.defined() && scale.scalar_type() == at::kFloat && scale.numel() == 1,
              "the levels of x need one float32 scale");
  t.scale = scale.data_ptr<float>();
  if (x.scalar_type() == at::kChar) {
    t.l8 = x.data_ptr<int8_t>();
  } else {
    t.l16 = x.data_ptr<int16_t>();
  }
  return t;
}

void check_mat(const at::Tensor& mat) {
  TORCH_CHECK(mat.device().is_cpu() && mat.scalar_type() == at::kFloat && mat.is_contiguous() &&
                  mat.dim() == 2 && mat.size(0) <= kMaxAlpha && mat.size(1) <= kMaxAlpha,
              "mat must be a contiguous float32 CPU matrix of at most 8 x 8");
}

// The sum of a vector's lanes, in order.
inline float lane_sum(vf v) {
  float t = 0.0f;
  for (int64_t l = 0; l < kV; ++l) t += v[l];
  return t;
}

// The row pass of one block of kV tiles: rows[r][j] = sum_i M[r][i] x[i][j] (the forward's
// first half; the backward recomputes it).
template <int A, int P>
inline void row_pass(const float* M, const vf* __restrict x, vf* __restrict rows) {
  #pragma GCC unroll 64
  for (int r = 0; r < P; ++r) {
    vf acc[A] = {};
    #pragma GCC unroll 64
    for (int i = 0; i < A; ++i) {
      const float w = M[r * A + i];
      #pragma GCC unroll 64
      for (int j = 0; j < A; ++j) acc[j] += w * x[i * A + j];
    }
    #pragma GCC unroll 64
    for (int j = 0; j < A; ++j) rows[r * A + j] = acc[j];
  }
}

// One block of kV tiles, forward: o[r*P+s] = sum_j M[s][j] sum_i M[r][i] x[i*A+j].
template <int A, int P>
inline void forward_block(const float* M, const vf* __restrict x, vf* __restrict o) {
  vf rows[P * A];
  row_pass<A, P>(M, x, rows);
  #pragma GCC unroll 64
  for (int r = 0; r < P; ++r) {  // o[r][s] = sum_j M[s][j] rows[r][j]
    vf acc[P] = {};
    #pragma GCC unroll 64
    for (int j = 0; j < A; ++j) {
      #pragma GCC unroll 64
      for (int s = 0; s < P; ++s) acc[s] += M[s * A + j] * rows[r * A + j];
    }
    #pragma GCC unroll 64
    for (int s = 0; s < P; ++s) o[r * P + s] = acc[s];
  }
}

template <int A, int P>
void transform2d_impl(const float* M, const TileRows& x, float* po, int64_t count,
                      const Untile& u) {
  const int64_t chunks = (count + kTileChunk - 1) / kTileChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    vf xv[A * A], ov[P * P];
    for (int64_t c0 = begin * kTileChunk; c0 < std::min(end * kTileChunk, count); c0 += kV) {
      const int64_t n = std::min(kV, count - c0);
      load_block(x, A * A, c0, n, xv);
      forward_block<A, P>(M, xv, ov);
      if (u.m) {
        store_untiled(po, u, c0, n, ov);
      } else {
        store_block(po, P * P, count, c0, n, ov);
      }
    }
    stream_fence();  // this thread's non-temporal stores visible before the join
  });
}

template <int A, int P>
void transform2d_backward_impl(const float* M, const TileRows& x, const float* pg, float* pgt,
                               float* partial, int64_t count, int64_t chunk, bool need_mat,
                               const Untile& u, const Window& gw, const int8_t* mask) {
  const int64_t chunks = (count + chunk - 1) / chunk;
  TileRows g;
  g.values = pg;
  g.rows = P * P;
  g.count = count;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    vf gv[P * P], grows[P * A], tv[A * A], xv[A * A], rows[P * A], dm[P * A];
    for (int64_t ch = begin; ch < end; ++ch) {
      #pragma GCC unroll 64
      for (int e = 0; e < P * A; ++e) dm[e] = vf{};
      const int64_t stop = std::min((ch + 1) * chunk, count);
      if (pgt && gw.m) zero_planes(pgt, gw, ch * chunk, stop);
      for (int64_t c0 = ch * chunk; c0 < stop; c0 += kV) {
        const int64_t n = std::min(kV, stop - c0);
        if (u.m) {
          load_untiled(pg, u, c0, n, gv);
        } else {
          load_block(g, P * P, c0, n, gv);
        }
        #pragma GCC unroll 64
        for (int r = 0; r < P; ++r) {  // d rows[r][j] = sum_s M[s][j] G[r][s]
          vf acc[A] = {};
          #pragma GCC unroll 64
          for (int s = 0; s < P; ++s) {
            #pragma GCC unroll 64
            for (int j = 0; j < A; ++j) acc[j] += M[s * A + j] * gv[r * P + s];
          }
          #pragma GCC unroll 64
          for (int j = 0; j < A; ++j) grows[r * A + j] = acc[j];
        }
        if (pgt) {  // d X[i][j] = sum_r M[r][i] d rows[r][j]
          #pragma GCC unroll 64
          for (int i = 0; i < A; ++i) {
            vf acc[A] = {};
            #pragma GCC unroll 64
            for (int r = 0; r < P; ++r) {
              const float w = M[r * A + i];
              #pragma GCC unroll 64
              for (int j = 0; j < A; ++j) acc[j] += w * grows[r * A + j];
            }
            #pragma GCC unroll 64
            for (int j = 0; j < A; ++j) tv[i * A + j] = acc[j];
          }
          if (gw.m) {
            scatter_block(pgt, gw, c0, n, tv);
          } else {
            if (mask) mask_block(mask, A * A, count, c0, n, tv);
            store_block(pgt, A * A, count, c0, n, tv);
          }
        }
        if (!need_mat) continue;
        load_block(x, A * A, c0, n, xv);
        row_pass<A, P>(M, xv, rows);  // recomputed, not kept
        // d M, one row q at a time in registers (loaded and stored once per block): the column
        // pass, d M[q][j] += sum_r G[r][q] rows[r][j], and the row pass, d M[q][i] += sum_j
        // d rows[q][j] X[i][j].
        #pragma GCC unroll 64
        for (int q = 0; q < P; ++q) {
          vf acc[A];
          #pragma GCC unroll 64
          for (int j = 0; j < A; ++j) acc[j] = dm[q * A + j];
          #pragma GCC unroll 64
          for (int r = 0; r < P; ++r) {
            const vf g = gv[r * P + q];
            #pragma GCC unroll 64
            for (int j = 0; j < A; ++j) acc[j] += g * rows[r * A + j];
          }
          #pragma GCC unroll 64
          for (int i = 0; i < A; ++i) {
            vf t = acc[i];
            #pragma GCC unroll 64
            for (int j = 0; j < A; ++j) t += grows[q * A + j] * xv[i * A + j];
            acc[i] = t;
          }
          #pragma GCC unroll 64
          for (int j = 0; j < A; ++j) dm[q * A + j] = acc[j];
        }
      }
      if (need_mat) {
        #pragma GCC unroll 64
        for (int e = 0; e < P * A; ++e) partial[ch * P * A + e] = lane_sum(dm[e]);
      }
    }
    stream_fence();  // this thread's non-temporal stores visible before the join
  });
}

// Calls f.template operator()<A, P>() for the shapes the Winograd layers of the search space
// use: alpha 4, 6, 8 (F2, F4, F6) and p = alpha (B^T) or alpha - 2 (A^T), and G (p = alpha,
// a = 3). False for any other shape (the torch form serves it). Each shape is some thousand
// lines of straight-line code.
template <typename F>
bool dispatch_shape(int64_t p, int64_t a, const F& f) {
#define WASEARCH_T2D(A_)                      \
  case A_:                                    \
    if (p == A_) {                            \
      f.template operator()<A_, A_>();        \
      return true;                            \
    }                                         \
    if (p == A_ - 2) {                        \
      f.template operator()<A_, A_ - 2>();    \
      return true;                            \
    }                                         \
    return false;
  switch (a) {
    case 3:  // G: the weights' 3 x 3 kernels to alpha x alpha
      if (p == 4) {
        f.template operator()<3, 4>();
        return true;
      }
      if (p == 6) {
        f.template operator()<3, 6>();
        return true;
      }
      if (p == 8) {
        f.template operator()<3, 8>();
        return true;
      }
      return false;
    WASEARCH_T2D(4)
    WASEARCH_T2D(6)
    WASEARCH_T2D(8)
    default:
      return false;
  }
#undef WASEARCH_T2D
}

}  // namespace

// Whether transform2d serves a (p, a) matrix.
bool transform2d_supports(int64_t p, int64_t a) {
  return dispatch_shape(p, a, [] <int A, int P>() {});
}

// untile: empty, or (N, K, H, W, th, tw) to return the N x K x H x W output of the layer (p = m)
// instead of the position-major (p*p, count). window: empty, or (N, C, H, W, th, tw) when
// tiles is the layer's input x itself (N x C x H x W), its tiles read in place (the gather
// fused in: the same values as gather_tiles' tiles, so the same outputs bit for bit). tiles
// may be integer levels with their scale (one, or one per row; not with window): each value
// rebuilt as level * scale, as the quantizer made it, so the same outputs as from the values.
at::Tensor transform2d(const at::Tensor& mat, const at::Tensor& tiles,
                       const std::vector<int64_t>& untile, const std::vector<int64_t>& window,
                       const std::optional<at::Tensor>& level_scale) {
  check_mat(mat);
  const bool levels = level_scale.has_value() && level_scale->defined();
  const at::Tensor scale = levels ? *level_scale : at::Tensor();
  TORCH_CHECK(levels || tiles.scalar_type() == at::kFloat, "tiles must be float32");
  const int64_t p = mat.size(0), a = mat.size(1);
  TORCH_CHECK(window.empty() || untile.empty(), "untile and window exclude each other");
  TORCH_CHECK(window.empty() || !levels, "window reads float32 x");
  const TileRows x = window.empty() ? tile_rows(tiles, levels ? scale : at::Tensor())
                                    : window_rows(tiles, at::Tensor(), window, a);
  const int64_t count = x.count;
  TORCH_CHECK(x.rows == a * a, "tiles must have alpha^2 rows");
  const Untile u = untile_of(untile, p, count);
  const auto opts = tiles.options().dtype(at::kFloat);
  at::Tensor out = u.m ? at::empty({u.n, u.k, u.h, u.w}, opts) : at::empty({p * p, count}, opts);
  const float* M = mat.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const bool ok = dispatch_shape(
      p, a, [&] <int A, int P>() { transform2d_impl<A, P>(M, x, po, count, u); });
  stream_fence();
  TORCH_CHECK(ok, "transform2d: unsupported matrix shape");
  return out;
}

// The gradients of transform2d: {d tiles (a*a, count) or undefined, d mat (p, a) or
// undefined}. For d mat, tiles may be the integer levels the forward kept, with their scale.
// grad is (p*p, count), or with untile (as the forward's) N x K x H x W. With window (as the
// forward's), tiles is x or its levels (one scale) and d tiles is d x (N x C x H x W): each
// tile's gradient added to its window's pixels, in increasing tile order; the work is then
// split into whole images, and d mat's partial sums with it, so that no two threads add into
// one pixel and the sums do not depend on the number of threads. tiles_mask (optional, int8
// 0/1 laid out as d tiles, position-major only): d tiles multiplied by it as it is written, the
// straight-through gradient of a quantizer that clipped the tiles (masked_grad's products).
std::vector<at::Tensor> transform2d_backward(const at::Tensor& mat, const at::Tensor& tiles,
                                             const at::Tensor& scale, const at::Tensor& grad,
                                             bool need_tiles, bool need_mat,
                                             const std::vector<int64_t>& untile,
                                             const std::vector<int64_t>& window,
                                             const std::optional<at::Tensor>& tiles_mask) {
  check_mat(mat);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "grad must be a contiguous float32 CPU tensor");
  const int64_t p = mat.size(0), a = mat.size(1);
  TORCH_CHECK(window.empty() || untile.empty(), "untile and window exclude each other");
  const Window gw = window.empty() ? Window() : window_of(window, a);
  int64_t count = 0;
  if (gw.m) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == p * p &&
                    grad.size(1) == gw.n * gw.c * gw.tiles_per_plane(),
                "grad must be (p^2, count) as window says");
    count = grad.size(1);
  } else if (untile.empty()) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == p * p, "grad must be (p^2, count)");
    count = grad.size(1);
  } else {
    TORCH_CHECK(untile.size() == 6, "untile must be (N, K, H, W, th, tw)");
    count = untile[0] * untile[1] * untile[4] * untile[5];
  }
  const Untile u = untile_of(untile, p, count);
  TORCH_CHECK(!u.m || (grad.dim() == 4 && grad.size(0) == u.n && grad.size(1) == u.k &&
                       grad.size(2) == u.h && grad.size(3) == u.w),
              "grad must be N x K x H x W as untile says");
  TileRows x;
  if (need_mat) {
    x = gw.m ? window_rows(tiles, scale, window, a) : tile_rows(tiles, scale);
    TORCH_CHECK(x.rows == a * a && x.count == count, "tiles and grad disagree in shape");
  }
  const float* M = mat.data_ptr<float>();
  const float* pg = grad.data_ptr<float>();
  at::Tensor gt;
  if (need_tiles) {
    gt = gw.m ? at::empty({gw.n, gw.c, gw.h, gw.w}, grad.options())
              : at::empty({a * a, count}, grad.options());
  }
  float* pgt = need_tiles ? gt.data_ptr<float>() : nullptr;
  const bool masked = tiles_mask.has_value() && tiles_mask->defined();
  TORCH_CHECK(!masked || (need_tiles && !gw.m), "tiles_mask needs d tiles, position-major");
  TORCH_CHECK(!masked || (tiles_mask->scalar_type() == at::kChar && tiles_mask->is_contiguous() &&
                          tiles_mask->numel() == gt.numel()),
              "tiles_mask must be a contiguous int8 tensor the size of d tiles");
  const int8_t* pmask = masked ? tiles_mask->data_ptr<int8_t>() : nullptr;
  const int64_t chunk =
      gw.m ? std::max<int64_t>(1, kTileChunk / gw.tiles_per_plane()) * gw.tiles_per_plane()
           : kTileChunk;
  const int64_t chunks = (count + chunk - 1) / chunk;
  std::vector<float> partial(need_mat ? chunks * p * a : 0, 0.0f);
  const bool ok = dispatch_shape(p, a, [&] <int A, int P>() {
    transform2d_backward_impl<A, P>(M, x, pg, pgt, partial.data(), count, chunk, need_mat, u,
                                    gw, pmask);
  });
  stream_fence();
  TORCH_CHECK(ok, "transform2d_backward: unsupported matrix shape");
  at::Tensor gm;
  if (need_mat) {
    gm = at::empty({p, a}, mat.options());
    float* pm = gm.data_ptr<float>();
    for (int64_t e = 0; e < p * a; ++e) {
      double total = 0.0;
      for (int64_t ch = 0; ch < chunks; ++ch) total += partial[ch * p * a + e];
      pm[e] = static_cast<float>(total);
    }
  }
  return {gt, gm};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("winograd_input", &winograd_input, "deploy Winograd: input tiles transformed, NHWC");
  m.def("winograd_input_q8", &winograd_input_q8,
        "deploy Winograd: input tiles transformed and quantized to uint8, tile-major");
  m.def("q8_product_supported", &q8_product_supported,
        "whether q8_product runs here (AVX-512 build, VNNI CPU)");
  m.def("q8_product", &q8_product, "deploy Winograd: the 8-bit Winograd-domain product (VNNI)");
  m.def("grid_bmm_backward_supported", &grid_bmm_backward_supported,
        "whether grid_bmm_backward runs here (AVX-512 build)");
  m.def("grid_bmm_backward", &grid_bmm_backward,
        "training: the gradients of the Winograd-domain product, read from the levels",
        pybind11::arg("grad"), pybind11::arg("u_codes"), pybind11::arg("u_scale"),
        pybind11::arg("v_codes"), pybind11::arg("v_scale"), pybind11::arg("need_u"),
        pybind11::arg("need_v"), pybind11::arg("v_mask") = pybind11::none());
  m.def("q8_grid_bmm", &q8_grid_bmm,
        "training: the Winograd-domain product of two 8-bit grids, exact integer sums (VNNI)");
  m.def("f32_bmm", &f32_bmm, "deploy Winograd: the float32 Winograd-domain product (AVX-512)");
  m.def("winograd_f32_conv", &winograd_f32_conv,
        "deploy Winograd: the float32 layer, input to output, in one call");
  m.def("winograd_q8_conv", &winograd_q8_conv,
        "deploy Winograd: the 8-bit layer on the VNNI path, input to output, in one call",
        py::arg("x"), py::arg("B_t"), py::arg("A_t"), py::arg("inv_scale"), py::arg("pos_scale"),
        py::arg("wpack"), py::arg("wsum"), py::arg("wscale"), py::arg("K"), py::arg("bias"),
        py::arg("chunk_images"), py::arg("fuse_product") = true);
  m.def("winograd_output", &winograd_output, "deploy Winograd: output transform and untiling",
        py::arg("mprod"), py::arg("A_t"), py::arg("bias"), py::arg("out"), py::arg("th"),
        py::arg("tw"), py::arg("n0"), py::arg("pos_scale") = py::none());
  m.def("gather_tiles", &gather_tiles, "Winograd input tiles, position-major");
  m.def("scatter_tiles", &scatter_tiles, "the gradient of gather_tiles");
  m.def("quantize", &quantize, "fake-quantize: values, clip mask, integer levels");
  m.def("masked_grad", &masked_grad, "mask * grad");
  m.def("rebuild", &rebuild, "levels * scale");
  m.def("transform2d_supports", &transform2d_supports, "whether transform2d serves (p, a)");
  m.def("transform2d", &transform2d, "mat X mat^T of every tile, position-major or untiled",
        pybind11::arg("mat"), pybind11::arg("tiles"),
        pybind11::arg("untile") = std::vector<int64_t>{},
        pybind11::arg("window") = std::vector<int64_t>{},
        pybind11::arg("scale") = pybind11::none());
  m.def("transform2d_backward", &transform2d_backward, "the gradients of transform2d",
        pybind11::arg("mat"), pybind11::arg("tiles"), pybind11::arg("scale"),
        pybind11::arg("grad"), pybind11::arg("need_tiles"), pybind11::arg("need_mat"),
        pybind11::arg("untile") = std::vector<int64_t>{},
        pybind11::arg("window") = std::vector<int64_t>{},
        pybind11::arg("tiles_mask") = pybind11::none());
}
