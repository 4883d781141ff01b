// Fused CPU kernel of the element-level part of the hierarchical RNN step (no autograd).
//
// Computes exactly the function of `_element_update` in lightning_lopt/hrnn.py for every element
// of a flat buffer: the accumulators at K timescales, the 3K features, the parameter GRU with the
// per-tensor injected bias, the read-outs, and the per-tensor sums the epilogue needs. Elements
// are processed in tiles of 16 held structure-of-arrays on the stack, so every product and every
// activation is a 16-lane vector operation and nothing of the parameters' size is allocated.
// The Python step stays the reference; tests/test_kernel.py holds this kernel equal to it.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int BL = 16;  // lanes per tile: one AVX-512 register of floats

// Sizes known at compile time for the common configurations (0: read at run time), so that the
// small products unroll fully and their accumulators stay in registers.
template <int HT, int KT>
struct Dims {
  int H, K;
  Dims(int h, int k) : H(HT ? HT : h), K(KT ? KT : k) {}
};

template <int HT, int KT>
struct Caps {
  // Upper bounds of the stack arrays of one tile.
  static constexpr int H = HT ? HT : 64;
  static constexpr int K = KT ? KT : 16;
};

struct Weights {
  const float* wg;     // (F+H, 2H)
  const float* bg;     // (2H,)
  const float* wc;     // (F+H, H)
  const float* bc;     // (H,)
  const float* wo;     // (H+K, O)
  const float* bo;     // (O,)
  const float* table;  // (T, 3H+2): injected biases, problem-mean log lr, lr multiplier
  int64_t table_w;
  float keep, offset, ms_eps, eps, low, high;
};

// A (rows, cols) state buffer: element (e, c) at ptr[e * rs + c * cs]. Row-major buffers have
// cs == 1; feature-major ones (the optimizer's: each column contiguous) have rs == 1, which makes
// a tile's column one vector load instead of a gather.
template <typename T>
struct Mat {
  T* ptr;
  int64_t rs, cs;
};

template <typename S>
struct StatePtrs {
  const float* grad;
  Mat<const S> h, m, v;
  const S *bi, *bs, *ll;
  Mat<S> oh, om, ov;
  S *obi, *obs, *oll;
  float *ud, *ua;
  const int64_t* tid;
};

// 16 floats as one value: the compiler keeps arrays of these in registers when their sizes are
// compile-time constants, which the small products below depend on.
typedef float v16 __attribute__((vector_size(64), aligned(64), may_alias));

// acc[j] += sum_k in[k] * W[k * ld + j] for j < no, k < ni. Sizes fixed at compile time (NO, NI > 0)
// unroll fully with the accumulators in registers; 0 means a run-time size.
template <int NO, int NI>
inline void matvec(v16* acc, const v16* in, const float* W, int ld, int no, int ni) {
  if constexpr (NO > 0 && NI > 0) {
    v16 a[NO];
#pragma GCC unroll 64
    for (int j = 0; j < NO; ++j) a[j] = acc[j];
#pragma GCC unroll 4
    for (int k = 0; k < NI; ++k) {
      const v16 x = in[k];
      const float* wr = W + k * ld;
#pragma GCC unroll 64
      for (int j = 0; j < NO; ++j) a[j] += x * wr[j];
    }
#pragma GCC unroll 64
    for (int j = 0; j < NO; ++j) acc[j] = a[j];
  } else {
    for (int k = 0; k < ni; ++k) {
      const v16 x = in[k];
      const float* wr = W + k * ld;
      for (int j = 0; j < no; ++j) acc[j] += x * wr[j];
    }
  }
}

// Columns [0, cols) of nb rows of a row-major (rows, stride) float matrix into dst[col][lane] and
// back; padding lanes read as 0. Gathers and scatters where AVX-512 has them.
inline void load_cols(const float* src, int stride, int cols, int nb, float (*dst)[16]) {
#if defined(__AVX512F__)
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(stride));
  const __mmask16 mk = nb >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nb) - 1);
  for (int c = 0; c < cols; ++c)
    _mm512_store_ps(dst[c], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, idx, src + c, 4));
#else
  for (int c = 0; c < cols; ++c)
    for (int b = 0; b < 16; ++b) dst[c][b] = b < nb ? src[b * stride + c] : 0.0f;
#endif
}

inline void store_cols(float* dst, int stride, int cols, int nb, const float (*src)[16]) {
#if defined(__AVX512F__)
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(stride));
  const __mmask16 mk = nb >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nb) - 1);
  for (int c = 0; c < cols; ++c) _mm512_mask_i32scatter_ps(dst + c, mk, idx, _mm512_load_ps(src[c]), 4);
#else
  for (int c = 0; c < cols; ++c)
    for (int b = 0; b < nb; ++b) dst[b * stride + c] = src[c][b];
#endif
}

template <typename S>
inline float to_f(S x) { return static_cast<float>(x); }

template <typename S>
inline S from_f(float x) { return static_cast<S>(x); }

// 16 consecutive values of a state buffer to and from floats. bfloat16 widens by a 16-bit shift
// and narrows with round to nearest even (as c10::BFloat16), in one instruction where AVX-512 has it.
template <typename S>
inline void load16(const S* src, float* dst) {
#if defined(__AVX512F__)
  if constexpr (sizeof(S) == 2) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
    return;
  }
#endif
#pragma omp simd
  for (int b = 0; b < BL; ++b) dst[b] = to_f(src[b]);
}

template <typename S>
inline void store16(S* dst, const float* src) {
#if defined(__AVX512BF16__)
  if constexpr (sizeof(S) == 2) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<const __m256i&>(packed));
    return;
  }
#endif
#pragma omp simd
  for (int b = 0; b < BL; ++b) dst[b] = from_f<S>(src[b]);
}

// Columns [0, cols) of rows e0 .. e0+nb of a state buffer into dst[col][lane] (padding lanes 0).
template <typename S>
inline void load_tile(const Mat<const S>& a, int64_t e0, int cols, int nb, float (*dst)[16], float* wide) {
  const S* src = a.ptr + e0 * a.rs;
  if (a.rs == 1) {  // feature-major: each column of the tile is contiguous
    for (int c = 0; c < cols; ++c) {
      const S* col = src + c * a.cs;
      if constexpr (std::is_same<S, float>::value) {
#if defined(__AVX512F__)
        const __mmask16 mk = nb >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nb) - 1);
        _mm512_store_ps(dst[c], _mm512_maskz_loadu_ps(mk, col));
        continue;
#endif
      }
      if (nb == BL) {
        load16(col, dst[c]);
      } else {
        for (int b = 0; b < BL; ++b) dst[c][b] = b < nb ? to_f(col[b]) : 0.0f;
      }
    }
  } else if constexpr (std::is_same<S, float>::value) {
    load_cols(src, static_cast<int>(a.rs), cols, nb, dst);
  } else {
    // Widen the tile's contiguous rows first (a vector loop), then transpose as for float.
    for (int i = 0; i < nb * cols; ++i) wide[i] = to_f(src[i]);
    load_cols(wide, cols, cols, nb, dst);
  }
}

template <typename S>
inline void store_tile(const Mat<S>& a, int64_t e0, int cols, int nb, const float (*src)[16], float* wide) {
  S* dst = a.ptr + e0 * a.rs;
  if (a.rs == 1) {
    for (int c = 0; c < cols; ++c) {
      S* col = dst + c * a.cs;
      if constexpr (std::is_same<S, float>::value) {
#if defined(__AVX512F__)
        const __mmask16 mk = nb >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nb) - 1);
        _mm512_mask_storeu_ps(col, mk, _mm512_load_ps(src[c]));
        continue;
#endif
      }
      if (nb == BL) {
        store16(col, src[c]);
        continue;
      }
      for (int b = 0; b < nb; ++b) col[b] = from_f<S>(src[c][b]);
    }
  } else if constexpr (std::is_same<S, float>::value) {
    store_cols(dst, static_cast<int>(a.rs), cols, nb, src);
  } else {
    store_cols(wide, cols, cols, nb, src);
    for (int i = 0; i < nb * cols; ++i) dst[i] = from_f<S>(wide[i]);
  }
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// One thread's share: tiles [tile_begin, tile_end). Per-tensor sums go into `sums` (doubles,
// rows tensor_lo ..), accumulated per run of equal tensor ids so that a long tensor costs one
// vector add per value and tile, not a scatter per element.
template <int HT, int KT, bool ATT, typename S>
void run_tiles(const Dims<HT, KT> dims, const Weights& w, const StatePtrs<S>& p, int64_t n, int64_t tile_begin,
               int64_t tile_end, double* sums, int64_t tensor_lo, int64_t width) {
  const int H = dims.H, K = dims.K, F = 3 * K, G = 2 * H, O = ATT ? 5 : 4;
  constexpr int CH = Caps<HT, KT>::H, CK = Caps<HT, KT>::K, CF = 3 * CK, CW = CH + CF + 2;
  alignas(64) float g[BL], bi[BL], bs[BL], ll[BL];
  alignas(64) float h[CH][BL], m[CK][BL], v[CK][BL], inj[3 * CH][BL], rel[BL], lr_e[BL];
  alignas(64) float z[CF][BL], gate[2 * CH][BL], cand[CH][BL], rh[CH][BL], hn[CH][BL], out[5][BL];
  alignas(64) float red[CW][BL];
  alignas(64) double run[CW][BL];
  alignas(64) float wide[BL * (CH > CK ? CH : CK)];  // one tile's rows of a bfloat16 state buffer, widened
  int64_t run_tensor = -1;

  auto flush = [&]() {
    if (run_tensor < 0) return;
    double* row = sums + (run_tensor - tensor_lo) * width;
    for (int j = 0; j < width; ++j) {
      double s = 0.0;
      for (int b = 0; b < BL; ++b) s += run[j][b];
      row[j] += s;
    }
    run_tensor = -1;
  };

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t e0 = tile * BL;
    const int nb = static_cast<int>(std::min<int64_t>(BL, n - e0));
    // ---- load (padding lanes get harmless values; they are neither stored nor reduced)
    // Tensor ids never decrease along the flat vector (Layout.build), so a tile lies in one tensor
    // exactly when its first and last elements do.
    const int64_t t_first = p.tid[e0];
    const bool uniform = p.tid[e0 + nb - 1] == t_first;
    const bool full = uniform && nb == BL;  // the common tile: plain vector loads and stores
    load_tile(p.h, e0, H, nb, h, wide);
    load_tile(p.m, e0, K, nb, m, wide);
    load_tile(p.v, e0, K, nb, v, wide);
    if (full) {
      const float* row = w.table + t_first * w.table_w;
      const float rel0 = row[3 * H], lr0 = row[3 * H + 1];
      load16(p.bi + e0, bi);
      load16(p.bs + e0, bs);
      load16(p.ll + e0, ll);
#pragma omp simd
      for (int b = 0; b < BL; ++b) {
        g[b] = p.grad[e0 + b];
        rel[b] = ll[b] - rel0;
        lr_e[b] = lr0;
      }
    } else for (int b = 0; b < BL; ++b) {
      const bool in = b < nb;
      const int64_t e = e0 + (in ? b : 0);
      g[b] = in ? p.grad[e] : 0.0f;
      bi[b] = in ? to_f(p.bi[e]) : 0.0f;
      bs[b] = in ? to_f(p.bs[e]) : 0.0f;
      ll[b] = in ? to_f(p.ll[e]) : 0.0f;
      const float* row = w.table + p.tid[e] * w.table_w;
      if (!uniform)
        for (int j = 0; j < 3 * H; ++j) inj[j][b] = row[j];
      rel[b] = ll[b] - row[3 * H];
      lr_e[b] = row[3 * H + 1];
    }
    const float* urow = w.table + t_first * w.table_w;  // the injected biases of a uniform tile

    // ---- features: accumulators at K timescales, rescaled momenta, products, relative log magnitudes
    {
      alignas(64) float beta[BL], logsum[BL];
      for (int b = 0; b < BL; ++b) { beta[b] = bi[b]; logsum[b] = 0.0f; }
      for (int s = 0; s < K; ++s) {
#pragma omp simd
        for (int b = 0; b < BL; ++b) {
          // beta_in ** 2**-s as repeated square roots, as the reference computes it.
          const float be = s == 0 ? beta[b] : std::sqrt(beta[b]);
          beta[b] = be;
          const float a = (1.0f - be) * g[b] + be * m[s][b];
          const float vv = (1.0f - bs[b]) * (a * a + w.ms_eps) + bs[b] * v[s][b];
          m[s][b] = a;
          v[s][b] = vv;
          z[s][b] = std::asinh(a * (1.0f / std::sqrt(vv + w.eps)));
          const float lm = std::log(vv + w.eps);
          z[2 * K - 1 + s][b] = lm;
          logsum[b] += lm;
        }
      }
      const float inv_k = 1.0f / static_cast<float>(K);
      for (int s = 0; s + 1 < K; ++s)
#pragma omp simd
        for (int b = 0; b < BL; ++b) z[K + s][b] = z[s][b] * z[s + 1][b];
      for (int s = 0; s < K; ++s)
#pragma omp simd
        for (int b = 0; b < BL; ++b) z[2 * K - 1 + s][b] -= logsum[b] * inv_k;
#pragma omp simd
      for (int b = 0; b < BL; ++b) z[F - 1][b] = rel[b];
    }

    // ---- parameter GRU: gates from [z, h], candidate from [z, r*h]
    constexpr int FT = KT ? 3 * KT : 0, GT = HT ? 2 * HT : 0, OT = ATT ? 5 : 4;
    v16* vg = reinterpret_cast<v16*>(gate);
    v16* vc = reinterpret_cast<v16*>(cand);
    for (int j = 0; j < G; ++j)
      if (uniform) vg[j] = v16{} + (w.bg[j] + urow[j]);
      else vg[j] = reinterpret_cast<const v16*>(inj)[j] + w.bg[j];
    matvec<GT, FT>(vg, reinterpret_cast<const v16*>(z), w.wg, G, G, F);
    matvec<GT, HT>(vg, reinterpret_cast<const v16*>(h), w.wg + F * G, G, G, H);
    for (int j = 0; j < G; ++j)
#pragma omp simd
      for (int b = 0; b < BL; ++b) gate[j][b] = sigmoidf(gate[j][b]);
    for (int k = 0; k < H; ++k)
#pragma omp simd
      for (int b = 0; b < BL; ++b) rh[k][b] = gate[k][b] * h[k][b];
    for (int j = 0; j < H; ++j)
      if (uniform) vc[j] = v16{} + (w.bc[j] + urow[G + j]);
      else vc[j] = reinterpret_cast<const v16*>(inj)[G + j] + w.bc[j];
    matvec<HT, FT>(vc, reinterpret_cast<const v16*>(z), w.wc, H, H, F);
    matvec<HT, HT>(vc, reinterpret_cast<const v16*>(rh), w.wc + F * H, H, H, H);
    for (int j = 0; j < H; ++j)
#pragma omp simd
      for (int b = 0; b < BL; ++b) {
        const float u = gate[H + j][b];
        hn[j][b] = u * h[j][b] + (1.0f - u) * std::tanh(cand[j][b]);
      }

    // ---- read-outs from [h', x]: direction, log lr delta, beta_sc, beta_in (, attention)
    v16* vo = reinterpret_cast<v16*>(out);
    for (int o = 0; o < O; ++o) vo[o] = v16{} + w.bo[o];
    matvec<OT, HT>(vo, reinterpret_cast<const v16*>(hn), w.wo, O, O, H);
    matvec<OT, KT>(vo, reinterpret_cast<const v16*>(z), w.wo + H * O, O, O, K);
    alignas(64) float o_ud[BL], o_ua[BL], o_ll[BL], o_bi[BL], o_bs[BL];
#pragma omp simd
    for (int b = 0; b < BL; ++b) {
      const float step = std::min(std::max(ll[b] + out[1][b], w.low), w.high);
      o_ll[b] = w.keep * ll[b] + (1.0f - w.keep) * step;
      o_ud[b] = std::exp(step + w.offset) * lr_e[b] * out[0][b];
      o_ua[b] = ATT ? std::exp(step) * lr_e[b] * out[O - 1][b] : o_ud[b];
      o_bs[b] = sigmoidf(out[2][b]);
      o_bi[b] = sigmoidf(out[3][b]);
    }

    // ---- store (after every load of this tile, so outputs may alias inputs)
    store_tile(p.oh, e0, H, nb, hn, wide);
    store_tile(p.om, e0, K, nb, m, wide);
    store_tile(p.ov, e0, K, nb, v, wide);
    if (full) {
      store16(p.obi + e0, o_bi);
      store16(p.obs + e0, o_bs);
      store16(p.oll + e0, o_ll);
#pragma omp simd
      for (int b = 0; b < BL; ++b) {
        p.ud[e0 + b] = o_ud[b];
        p.ua[e0 + b] = o_ua[b];
      }
    } else for (int b = 0; b < nb; ++b) {
      const int64_t e = e0 + b;
      p.obi[e] = from_f<S>(o_bi[b]);
      p.obs[e] = from_f<S>(o_bs[b]);
      p.oll[e] = from_f<S>(o_ll[b]);
      p.ud[e] = o_ud[b];
      p.ua[e] = o_ua[b];
    }

    // ---- per-tensor reduction values: h', z, d^2 (, a^2)
    for (int k = 0; k < H; ++k)
#pragma omp simd
      for (int b = 0; b < BL; ++b) red[k][b] = b < nb ? hn[k][b] : 0.0f;
    for (int k = 0; k < F; ++k)
#pragma omp simd
      for (int b = 0; b < BL; ++b) red[H + k][b] = b < nb ? z[k][b] : 0.0f;
#pragma omp simd
    for (int b = 0; b < BL; ++b) {
      red[H + F][b] = b < nb ? out[0][b] * out[0][b] : 0.0f;
      if (ATT) red[H + F + 1][b] = b < nb ? out[O - 1][b] * out[O - 1][b] : 0.0f;
    }
    if (uniform) {
      if (run_tensor != t_first) {
        flush();
        run_tensor = t_first;
        for (int j = 0; j < width; ++j)
          for (int b = 0; b < BL; ++b) run[j][b] = 0.0;
      }
      for (int j = 0; j < width; ++j)
#pragma omp simd
        for (int b = 0; b < BL; ++b) run[j][b] += static_cast<double>(red[j][b]);
    } else {
      flush();
      for (int b = 0; b < nb; ++b) {
        double* row = sums + (p.tid[e0 + b] - tensor_lo) * width;
        for (int j = 0; j < width; ++j) row[j] += static_cast<double>(red[j][b]);
      }
    }
  }
  flush();
}

template <int HT, int KT, bool ATT, typename S>
void run_all(int H, int K, const Weights& w, const StatePtrs<S>& p, int64_t n, torch::Tensor sums_out) {
  const Dims<HT, KT> dims(H, K);
  const int64_t width = sums_out.size(1);
  const int64_t tiles = (n + BL - 1) / BL;
  // Work is handed out in blocks of 256 tiles (4096 elements) on demand, so a thread that the OS
  // deschedules (other processes on the cores) delays the step by one block, not by its whole
  // share. Each block keeps its own per-tensor sums, merged in block order afterwards: the result
  // is the same for every thread count.
  constexpr int64_t block_tiles = 256;
  const int64_t blocks = (tiles + block_tiles - 1) / block_tiles;
  // A single block (under 4096 elements) runs on the calling thread: a parallel region would cost more.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
  std::vector<std::vector<double>> partial(blocks);
  std::vector<int64_t> lows(blocks, 0), highs(blocks, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t tb = blk * block_tiles, te = std::min(tiles, tb + block_tiles);
    const int64_t eb = tb * BL, ee = std::min<int64_t>(te * BL, n);
    int64_t lo = p.tid[eb], hi = p.tid[eb];
    for (int64_t e = eb; e < ee; ++e) {
      lo = std::min(lo, p.tid[e]);
      hi = std::max(hi, p.tid[e]);
    }
    partial[blk].assign((hi - lo + 1) * width, 0.0);
    lows[blk] = lo;
    highs[blk] = hi;
    run_tiles<HT, KT, ATT, S>(dims, w, p, n, tb, te, partial[blk].data(), lo, width);
  }
  // Only the tensors this range touches are merged: a lane of many (element_update_lanes) owns a few rows.
  const int64_t first = *std::min_element(lows.begin(), lows.end());
  const int64_t last = *std::max_element(highs.begin(), highs.end());
  float* out = sums_out.data_ptr<float>() + first * width;
  std::vector<double> total((last - first + 1) * width, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t rows = static_cast<int64_t>(partial[blk].size()) / width;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < width; ++j) total[(lows[blk] - first + r) * width + j] += partial[blk][r * width + j];
  }
  for (int64_t i = 0; i < static_cast<int64_t>(total.size()); ++i) out[i] += static_cast<float>(total[i]);
}

template <typename S>
void dispatch(int H, int K, bool att, const Weights& w, const StatePtrs<S>& p, int64_t n, torch::Tensor sums) {
  if (H == 10 && K == 4) {
    att ? run_all<10, 4, true, S>(H, K, w, p, n, sums) : run_all<10, 4, false, S>(H, K, w, p, n, sums);
  } else {
    att ? run_all<0, 0, true, S>(H, K, w, p, n, sums) : run_all<0, 0, false, S>(H, K, w, p, n, sums);
  }
}

void check(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows, int64_t cols,
           bool any_major = false) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.size(0) == rows, name, " has ", t.size(0), " rows, expected ", rows);
  if (cols >= 0) TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, name, " must have ", cols, " columns");
  const bool feature_major = any_major && t.dim() == 2 && t.stride(0) == 1 && t.t().is_contiguous();
  TORCH_CHECK(t.is_contiguous() || feature_major, name,
              any_major ? " must be contiguous or feature-major (its transpose contiguous)" : " must be contiguous");
}

template <typename T>
Mat<T> mat(const torch::Tensor& t) {
  // A contiguous buffer is read row by row even where its strides would also allow columns (one row).
  if (t.is_contiguous()) return Mat<T>{static_cast<T*>(t.data_ptr()), t.size(1), 1};
  return Mat<T>{static_cast<T*>(t.data_ptr()), 1, t.stride(1)};
}

}  // namespace

// state: (grad, h_param, momentum, mean_square, beta_in, beta_sc, log_lr); out: the same six state
// buffers (may be the inputs themselves) then step_d and step_a; weights as `_element_weights`.
void element_update(std::vector<torch::Tensor> state, torch::Tensor tensor_ids, torch::Tensor table,
                    std::vector<torch::Tensor> weights, std::vector<torch::Tensor> out, torch::Tensor sums,
                    bool attention, double keep, double offset, double ms_eps, double eps, double low, double high) {
  TORCH_CHECK(state.size() == 7 && out.size() == 8 && weights.size() == 6, "element_update: wrong argument counts");
  const int64_t n = state[0].size(0);
  const int64_t H = state[1].size(1), K = state[2].size(1), F = 3 * K, O = attention ? 5 : 4;
  TORCH_CHECK(H <= 64 && K <= 16, "element_update supports param_units <= 64 and num_timescales <= 16");
  TORCH_CHECK(n > 0, "element_update needs at least one element");
  const auto sd = state[1].scalar_type();
  TORCH_CHECK(sd == at::kFloat || sd == at::kBFloat16, "state must be float32 or bfloat16");
  check(state[0], "grad", at::kFloat, n, -1);
  check(state[1], "h_param", sd, n, H, true);
  check(state[2], "momentum", sd, n, K, true);
  check(state[3], "mean_square", sd, n, K, true);
  for (int i = 4; i < 7; ++i) check(state[i], "beta_in/beta_sc/log_lr", sd, n, -1);
  check(out[0], "out h_param", sd, n, H, true);
  check(out[1], "out momentum", sd, n, K, true);
  check(out[2], "out mean_square", sd, n, K, true);
  for (int i = 3; i < 6; ++i) check(out[i], "out beta_in/beta_sc/log_lr", sd, n, -1);
  check(out[6], "step_d", at::kFloat, n, -1);
  check(out[7], "step_a", at::kFloat, n, -1);
  check(tensor_ids, "tensor_ids", at::kLong, n, -1);
  check(table, "table", at::kFloat, table.size(0), 3 * H + 2);
  check(weights[0], "w_gates", at::kFloat, F + H, 2 * H);
  check(weights[1], "b_gates", at::kFloat, 2 * H, -1);
  check(weights[2], "w_cand", at::kFloat, F + H, H);
  check(weights[3], "b_cand", at::kFloat, H, -1);
  check(weights[4], "w_out", at::kFloat, H + K, O);
  check(weights[5], "b_out", at::kFloat, O, -1);
  check(sums, "sums", at::kFloat, table.size(0), H + F + 1 + (attention ? 1 : 0));

  Weights w{weights[0].data_ptr<float>(), weights[1].data_ptr<float>(), weights[2].data_ptr<float>(),
            weights[3].data_ptr<float>(), weights[4].data_ptr<float>(), weights[5].data_ptr<float>(),
            table.data_ptr<float>(), table.size(1), static_cast<float>(keep), static_cast<float>(offset),
            static_cast<float>(ms_eps), static_cast<float>(eps), static_cast<float>(low), static_cast<float>(high)};
  const int64_t* tid = tensor_ids.data_ptr<int64_t>();
  if (sd == at::kFloat) {
    StatePtrs<float> p{state[0].data_ptr<float>(),
                       mat<const float>(state[1]), mat<const float>(state[2]), mat<const float>(state[3]),
                       state[4].data_ptr<float>(), state[5].data_ptr<float>(), state[6].data_ptr<float>(),
                       mat<float>(out[0]), mat<float>(out[1]), mat<float>(out[2]),
                       out[3].data_ptr<float>(), out[4].data_ptr<float>(), out[5].data_ptr<float>(),
                       out[6].data_ptr<float>(), out[7].data_ptr<float>(), tid};
    dispatch<float>(H, K, attention, w, p, n, sums);
  } else {
    using B = c10::BFloat16;
    StatePtrs<B> p{state[0].data_ptr<float>(),
                   mat<const B>(state[1]), mat<const B>(state[2]), mat<const B>(state[3]),
                   state[4].data_ptr<B>(), state[5].data_ptr<B>(), state[6].data_ptr<B>(),
                   mat<B>(out[0]), mat<B>(out[1]), mat<B>(out[2]),
                   out[3].data_ptr<B>(), out[4].data_ptr<B>(), out[5].data_ptr<B>(),
                   out[6].data_ptr<float>(), out[7].data_ptr<float>(), tid};
    dispatch<B>(H, K, attention, w, p, n, sums);
  }
}

// The same for L lanes, each a contiguous range of elements [starts[l], starts[l + 1]) with its own
// weights: weights as in element_update with a leading lane dimension, keep and offset (L,). Lanes
// are the particles of evolution-strategies meta-training, each running its own meta-parameters.
// Buffers must be contiguous (row-major), so a lane's rows are one pointer offset away.
void element_update_lanes(std::vector<torch::Tensor> state, torch::Tensor tensor_ids, torch::Tensor table,
                          std::vector<torch::Tensor> weights, torch::Tensor starts, torch::Tensor keep,
                          torch::Tensor offset, std::vector<torch::Tensor> out, torch::Tensor sums, bool attention,
                          double ms_eps, double eps, double low, double high) {
  TORCH_CHECK(state.size() == 7 && out.size() == 8 && weights.size() == 6, "element_update_lanes: wrong argument counts");
  const int64_t n = state[0].size(0), L = starts.size(0) - 1;
  const int64_t H = state[1].size(1), K = state[2].size(1), F = 3 * K, O = attention ? 5 : 4;
  TORCH_CHECK(H <= 64 && K <= 16, "element_update_lanes supports param_units <= 64 and num_timescales <= 16");
  TORCH_CHECK(state[1].scalar_type() == at::kFloat, "element_update_lanes: state must be float32");
  for (auto& t : state) check(t, "state", at::kFloat, n, -1);
  for (auto& t : out) check(t, "out", at::kFloat, n, -1);
  check(tensor_ids, "tensor_ids", at::kLong, n, -1);
  check(table, "table", at::kFloat, table.size(0), 3 * H + 2);
  check(sums, "sums", at::kFloat, table.size(0), H + F + 1 + (attention ? 1 : 0));
  check(starts, "starts", at::kLong, L + 1, -1);
  check(keep, "keep", at::kFloat, L, -1);
  check(offset, "offset", at::kFloat, L, -1);
  const int64_t shapes[6][2] = {{F + H, 2 * H}, {2 * H, 1}, {F + H, H}, {H, 1}, {H + K, O}, {O, 1}};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK(weights[i].is_contiguous() && weights[i].scalar_type() == at::kFloat && weights[i].size(0) == L &&
                    weights[i].numel() == L * shapes[i][0] * shapes[i][1],
                "element_update_lanes: lane weight ", i, " must be contiguous float32 of shape (L, ...)");
  }
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(st[0] >= 0 && st[L] <= n, "element_update_lanes: starts out of range");
  const float* kp = keep.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  const int64_t* tid = tensor_ids.data_ptr<int64_t>();
  const float* f[6];
  int64_t stride[6];
  for (int i = 0; i < 6; ++i) {
    f[i] = weights[i].data_ptr<float>();
    stride[i] = shapes[i][0] * shapes[i][1];
  }
  for (int64_t l = 0; l < L; ++l) {
    const int64_t a = st[l], m = st[l + 1] - a;
    if (m <= 0) continue;
    Weights w{f[0] + l * stride[0], f[1] + l * stride[1], f[2] + l * stride[2], f[3] + l * stride[3],
              f[4] + l * stride[4], f[5] + l * stride[5], table.data_ptr<float>(), table.size(1), kp[l], op[l],
              static_cast<float>(ms_eps), static_cast<float>(eps), static_cast<float>(low), static_cast<float>(high)};
    auto rows = [&](torch::Tensor& t) { return Mat<float>{t.data_ptr<float>() + a * t.size(1), t.size(1), 1}; };
    auto crows = [&](torch::Tensor& t) {
      return Mat<const float>{t.data_ptr<float>() + a * t.size(1), t.size(1), 1};
    };
    StatePtrs<float> p{state[0].data_ptr<float>() + a, crows(state[1]), crows(state[2]), crows(state[3]),
                       state[4].data_ptr<float>() + a, state[5].data_ptr<float>() + a, state[6].data_ptr<float>() + a,
                       rows(out[0]), rows(out[1]), rows(out[2]),
                       out[3].data_ptr<float>() + a, out[4].data_ptr<float>() + a, out[5].data_ptr<float>() + a,
                       out[6].data_ptr<float>() + a, out[7].data_ptr<float>() + a, tid + a};
    dispatch<float>(H, K, attention, w, p, m, sums);
  }
}

// theta = theta_old - step_d * table[t, 0] - table[t, 2] * theta_old; phi = theta_old - step_a * table[t, 1]
// (phi = theta without attention). Outputs may alias theta_old.
void apply_update(torch::Tensor theta_old, torch::Tensor step_d, torch::Tensor step_a, torch::Tensor tensor_ids,
                  torch::Tensor table, torch::Tensor theta_out, torch::Tensor phi_out, bool attention) {
  const int64_t n = theta_old.size(0);
  check(theta_old, "theta_old", at::kFloat, n, -1);
  check(step_d, "step_d", at::kFloat, n, -1);
  check(step_a, "step_a", at::kFloat, n, -1);
  check(tensor_ids, "tensor_ids", at::kLong, n, -1);
  check(table, "update table", at::kFloat, table.size(0), 3);
  check(phi_out, "phi_out", at::kFloat, n, -1);
  if (attention) check(theta_out, "theta_out", at::kFloat, n, -1);
  const float* th = theta_old.data_ptr<float>();
  const float* d = step_d.data_ptr<float>();
  const float* a = step_a.data_ptr<float>();
  const int64_t* tid = tensor_ids.data_ptr<int64_t>();
  const float* tab = table.data_ptr<float>();
  float* to = attention ? theta_out.data_ptr<float>() : nullptr;
  float* po = phi_out.data_ptr<float>();
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const float* r = tab + tid[e] * 3;
      const float old = th[e];
      const float theta = old - d[e] * r[0] - r[2] * old;
      if (attention) {
        po[e] = old - a[e] * r[1];
        to[e] = theta;
      } else {
        po[e] = theta;
      }
    }
  });
}

// Segment sums of flat float32 vectors (of their squares with `square`): segment t is elements
// [starts[t], starts[t + 1]), and column i of the result sums xs[i]. Accumulated in double, like the
// element-level sums; a fixed order per segment, so the result does not depend on the thread count.
torch::Tensor segment_sums(std::vector<torch::Tensor> xs, torch::Tensor starts, bool square) {
  const int64_t T = starts.size(0) - 1, C = static_cast<int64_t>(xs.size());
  TORCH_CHECK(C > 0, "segment_sums needs at least one vector");
  const int64_t n = xs[0].size(0);
  for (auto& x : xs) check(x, "x", at::kFloat, n, -1);
  check(starts, "starts", at::kLong, T + 1, -1);
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(T >= 0 && st[0] >= 0 && st[T] <= n, "segment_sums: starts out of range");
  auto result = torch::empty({T, C}, xs[0].options());
  float* out = result.data_ptr<float>();
  std::vector<const float*> ptr(C);
  for (int64_t c = 0; c < C; ++c) ptr[c] = xs[c].data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        const float* x = ptr[c];
        double s = 0.0;
        if (square) {
#pragma omp simd reduction(+ : s)
          for (int64_t e = st[t]; e < st[t + 1]; ++e) s += static_cast<double>(x[e]) * x[e];
        } else {
#pragma omp simd reduction(+ : s)
          for (int64_t e = st[t]; e < st[t + 1]; ++e) s += static_cast<double>(x[e]);
        }
        out[t * C + c] = static_cast<float>(s);
      }
    }
  });
  return result;
}

namespace {

// Per tensor: sum_e g_e x_es, sum_e x_es^2 (s < K) and sum_e g_e^2, with x_s = m_s / sqrt(v_s + eps).
// Tiles of 16 elements as in the step (padding lanes read 0 and add 0); each tile's products are
// added in double, so a long tensor loses no more than the eager float sums do.
template <typename S>
void alignment_rows(const float* g, Mat<const S> m, Mat<const S> v, const int64_t* st, int64_t T, int K,
                    float eps, float* out) {
  const int W = 2 * K + 1;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float mt[16][BL], vt[16][BL], gt[BL];
    alignas(64) float wide[BL * 16];
    alignas(64) double acc[33][BL];
    for (int64_t t = begin; t < end; ++t) {
      for (int c = 0; c < W; ++c)
        for (int b = 0; b < BL; ++b) acc[c][b] = 0.0;
      for (int64_t e0 = st[t]; e0 < st[t + 1]; e0 += BL) {
        const int nb = static_cast<int>(std::min<int64_t>(BL, st[t + 1] - e0));
        load_tile(m, e0, K, nb, mt, wide);
        load_tile(v, e0, K, nb, vt, wide);
#pragma omp simd
        for (int b = 0; b < BL; ++b) gt[b] = b < nb ? g[e0 + b] : 0.0f;
        for (int s = 0; s < K; ++s) {
#pragma omp simd
          for (int b = 0; b < BL; ++b) {
            const float x = mt[s][b] * (1.0f / std::sqrt(vt[s][b] + eps));
            acc[s][b] += static_cast<double>(gt[b] * x);
            acc[K + s][b] += static_cast<double>(x * x);
          }
        }
#pragma omp simd
        for (int b = 0; b < BL; ++b) acc[2 * K][b] += static_cast<double>(gt[b] * gt[b]);
      }
      for (int c = 0; c < W; ++c) {
        double total = 0.0;
        for (int b = 0; b < BL; ++b) total += acc[c][b];
        out[t * W + c] = static_cast<float>(total);
      }
    }
  });
}

}  // namespace

// The step gain's per-tensor sums in one pass, without the (N, K) temporaries of the eager path:
// (T, 2K+1) float32 of [sum g x_s for s < K, sum x_s^2 for s < K, sum g^2], x_s = m_s / sqrt(v_s + eps).
torch::Tensor alignment_sums(torch::Tensor grad, torch::Tensor momentum, torch::Tensor mean_square,
                             torch::Tensor starts, double eps) {
  const int64_t n = grad.size(0), K = momentum.size(1), T = starts.size(0) - 1;
  TORCH_CHECK(K <= 16, "alignment_sums supports num_timescales <= 16");
  check(grad, "grad", at::kFloat, n, -1);
  const auto sd = momentum.scalar_type();
  TORCH_CHECK(sd == at::kFloat || sd == at::kBFloat16, "momentum must be float32 or bfloat16");
  check(momentum, "momentum", sd, n, K, true);
  check(mean_square, "mean_square", sd, n, K, true);
  check(starts, "starts", at::kLong, T + 1, -1);
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(T >= 0 && st[0] >= 0 && st[T] <= n, "alignment_sums: starts out of range");
  auto result = torch::empty({T, 2 * K + 1}, grad.options());
  if (sd == at::kFloat) {
    alignment_rows<float>(grad.data_ptr<float>(), mat<const float>(momentum), mat<const float>(mean_square), st, T,
                          static_cast<int>(K), static_cast<float>(eps), result.data_ptr<float>());
  } else {
    alignment_rows<c10::BFloat16>(grad.data_ptr<float>(), mat<const c10::BFloat16>(momentum),
                                  mat<const c10::BFloat16>(mean_square), st, T, static_cast<int>(K),
                                  static_cast<float>(eps),
                                  result.data_ptr<float>());
  }
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("element_update", &element_update, "Fused element-level part of the hierarchical RNN step (CPU)");
  m.def("element_update_lanes", &element_update_lanes,
        "Fused element-level part for lanes of elements with their own weights (CPU)");
  m.def("apply_update", &apply_update, "Parameter update with per-tensor normalisers (CPU)");
  m.def("segment_sums", &segment_sums, "Segment sums of flat vectors or of their squares (CPU)");
  m.def("alignment_sums", &alignment_sums, "Per-tensor sums of the step gain's alignment features (CPU)");
}
