// Matrix products for decoding on the CPU: y[m, o] = sum_k x[m, k] * w[o, k] with w stored as int8 (one scale per
// output), int4 (two codes a byte, a scale and a zero point per group of inputs) or bf16, and x, y float32.
//
// Decoding reads every weight once per token, so these stream each weight row once for several rows of x and
// keep the sums in registers (AVX2 + FMA where the compiler targets them, plain loops elsewhere). Every row of x is
// summed in the same order whatever the number of rows, so a batch gives each row the result it gets alone.
// chatglm_sft/models/cpu_kernels.py compiles this file on first use and calls it through ctypes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int kFloatTile = 4;  // bf16: rows of x multiplied together per pass over a weight row
// Bytes ahead of the weights read now that each step asks the cache for: the hardware prefetcher alone left one
// core's int4 loop waiting on its loads (17 -> 24 G weights/s on 2 cores with it; 1-8 KiB measured alike).
constexpr int64_t kPrefetch = 2048;
constexpr int64_t kBlock = 16; // weight rows a thread takes at a time (int8 4096-wide: 64 KiB, stays in L2)
// With several rows of x, their columns are taken this many bytes of x at a time, kept in L1 for the whole block of
// weight rows (packed: `packed_at`): whole rows of 8 x 4096 floats (128 KiB) came from L2 for every product. On the
// 2-core AMD host, 8 rows times a 2048 x 2048 bf16 weight in cache went from 26 to 43 G products/s; with the
// weights streamed from memory, as in decoding a large model, both ran at ~30-36. One row of x is taken whole: it is
// read once per weight row, at the rate the weights stream.
constexpr int64_t kChunkBytes = 16384;
// In chunks, a chunk of a weight row is followed by the same chunk of the next one: the weights prefetched are those
// this many rows later in that order (the next chunk of the block's first rows after its last ones).
constexpr int64_t kPrefetchRows = 2;
constexpr int kState = 16;  // floats of sums carried between the chunks of one weight row for one row of x

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 bf16 weights, in column order, as two vectors of 8 floats.
inline void load16(const uint16_t* w, int64_t k, __m256& a, __m256& b) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}
#endif

inline float weight_at(const uint16_t* w, int64_t k) { return bf16_to_float(w[k]); }

// dot[m] = sum_k x[m, k] * w[k] for m < ROWS (bf16 w), in parts: `dot_part` adds the columns [k0, k1) (a multiple
// of 32 apart; x: the rows' packed chunk, `ld` apart) to the sums carried in `state`, `dot_finish` totals them. Each
// row keeps two sums in flight (32 columns a step, two products each), enough for one row to outrun memory; four rows
// then fit the 16 vector registers. A row is summed in the same order however many rows come with it and however its
// columns are split.
template <int ROWS, typename W>
inline void dot_part(const float* x, int64_t ld, const W* w, int64_t k0, int64_t k1, int64_t ahead, float* state) {
#ifdef __AVX2__
  __m256 acc[ROWS][2];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < 2; ++v) acc[m][v] = _mm256_loadu_ps(state + m * kState + 8 * v);
  for (int64_t k = k0; k + 32 <= k1; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + ahead, _MM_HINT_T0);
    if (sizeof(W) == 2) _mm_prefetch(reinterpret_cast<const char*>(w + k) + ahead + 64, _MM_HINT_T0);
    __m256 wv[4];
    load16(w, k, wv[0], wv[1]);
    load16(w, k + 16, wv[2], wv[3]);
    for (int m = 0; m < ROWS; ++m)
      for (int v = 0; v < 4; ++v)
        acc[m][v & 1] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + m * ld + (k - k0) + 8 * v), acc[m][v & 1]);
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(state + m * kState + 8 * v, acc[m][v]);
#else
  (void)x, (void)ld, (void)w, (void)k0, (void)k1, (void)ahead, (void)state;
#endif
}

template <int ROWS, typename W>
inline void dot_finish(const float* x, int64_t in, const W* w, const float* state, float* dot) {
  int64_t k = 0;
#ifdef __AVX2__
  k = in / 32 * 32;
  for (int m = 0; m < ROWS; ++m)
    dot[m] = hsum(_mm256_add_ps(_mm256_loadu_ps(state + m * kState), _mm256_loadu_ps(state + m * kState + 8)));
#else
  (void)state;
  for (int m = 0; m < ROWS; ++m) dot[m] = 0;
#endif
  for (; k < in; ++k) {  // the rest (or everything, without AVX2)
    const float wf = weight_at(w, k);
    for (int m = 0; m < ROWS; ++m) dot[m] += wf * x[m * in + k];
  }
}

struct Problem {
  const float* x;             // bf16: [rows, in]
  const float* xp;            // bf16: x packed by chunks (`packed_at`), x itself when rows are taken whole
  int64_t rows, in, out;
  const void* w;              // int8 [out, in] | uint8 [out, in / 2] | bf16 [out, in]
  const float* scale;         // int8: [out]
  const uint16_t* scale_zero; // int4: bf16 [out, in / group, 2]
  const float* group_sums;    // int4: [rows, groups8], the sum of x over each group (in float)
  int64_t group;              // int4: a multiple of 32
  const int16_t* xq;          // int8, int4: x in int16 (`quantized`), packed by chunks (int4: in the codes' order)
  const float* xscale;        // int8, int4: [rows, groups8], x ~ xq * xscale
  float* y;                   // [rows, out]
  int64_t chunk;              // columns taken at a time (`chunk_columns`)
};

// Columns of x taken at a time for `rows` rows of `size` bytes a column: all of one row, else what fits kChunkBytes,
// a multiple of `unit` (which keeps each row's order of summing).
inline int64_t chunk_columns(int64_t rows, int64_t in, int64_t size, int64_t unit) {
  if (rows == 1) return in;
  return std::min(in, std::max<int64_t>(1, kChunkBytes / (rows * size * unit)) * unit);
}

// Where x[m, k] goes when x is packed for chunks of `chunk` columns: chunk by chunk, each chunk's rows one after the
// other. A chunk's rows then lie together in L1: left `in` apart, rows 4 or 8 KiB apart fell in the same cache sets
// and evicted each other. (With one chunk this is x's own layout.)
inline int64_t packed_at(int64_t m, int64_t k, int64_t rows, int64_t in, int64_t chunk) {
  const int64_t k0 = k / chunk * chunk;
  return k0 * rows + m * std::min(chunk, in - k0) + (k - k0);
}

// The packed chunk starting at column k0, from row m0 on.
template <typename T>
inline const T* chunk_of(const T* packed, const Problem& p, int64_t m0, int64_t k0) {
  return packed + k0 * p.rows + m0 * std::min(p.chunk, p.in - k0);
}

template <int ROWS>
struct Bf16Row {
  static constexpr int kTile = kFloatTile;
  static const char* at(const Problem& p, int64_t o, int64_t k) {
    return static_cast<const char*>(p.w) + 2 * (o * p.in + k);
  }
  static void part(const Problem& p, int64_t m0, int64_t o, int64_t k0, int64_t k1, int64_t ahead, float* state) {
    const float* x = chunk_of(p.xp, p, m0, k0);
    const uint16_t* w = static_cast<const uint16_t*>(p.w) + o * p.in;
    dot_part<ROWS>(x, std::min(p.chunk, p.in - k0), w, k0, k1, ahead, state);
  }
  static void finish(const Problem& p, int64_t m0, int64_t o, const float* state) {
    float dot[ROWS];
    dot_finish<ROWS>(p.x + m0 * p.in, p.in, static_cast<const uint16_t*>(p.w) + o * p.in, state, dot);
    for (int m = 0; m < ROWS; ++m) p.y[(m0 + m) * p.out + o] = dot[m];
  }
};

// int4: w = (q - 8) * scale + zero per group, so y = sum_g scale_g (q . x)_g + sum_g (zero_g - 8 scale_g) sum_g(x).
// (q . x)_g takes x quantized to int16 with one scale per group (`xq`, `xscale`: steps of 2^-15 of the group's
// largest value, finer than bf16's), so a group's products add up exactly in integers (madd, then adds: 128 * 15 *
// 32767 fits in int32), and only the group's total is converted to float. (chatglm.cpp quantizes x to int8 in blocks
// of 32; that took the int4 logits' error on a tiny model from 31% to 40% of an adapter's effect.)
//
// Codes unpack without shuffles: each 16-bit word of a step's bytes holds four codes, at bits 0, 4, 8 and 12 (the
// columns 4j+1, 4j, 4j+3, 4j+2 of the portable layout, where a byte's high nibble is the even column), so masks and
// shifts give four vectors of codes, and x is laid out to match (`kNibbleRun`). A step is 64 columns (32 bytes) when
// the group allows it, else 32.
inline int64_t int4_step(int64_t group) { return group % 64 == 0 ? 64 : 32; }

// x's layout for int4: within a step of s columns, column 4j + c goes to kNibbleRun[c] * s / 4 + j (the run of its
// code's nibble position, then its word).
constexpr int kNibbleRun[4] = {1, 0, 3, 2};

#ifdef __AVX2__
// sums[m] (8 int32 lanes) += the products of one step's codes with the matching columns of each of ROWS rows of xq.
template <int ROWS>
inline void int4_step64(const uint8_t* w, const int16_t* xq, int64_t in, int64_t ahead, __m256i* sums) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + ahead, _MM_HINT_T0);
  const __m256i nibble = _mm256_set1_epi16(15), v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i c0 = _mm256_and_si256(v, nibble), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                c2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), nibble), c3 = _mm256_srli_epi16(v, 12);
  for (int m = 0; m < ROWS; ++m) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xq + m * in);
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256(x)),
                                       _mm256_madd_epi16(c1, _mm256_loadu_si256(x + 1)));
    const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(c2, _mm256_loadu_si256(x + 2)),
                                       _mm256_madd_epi16(c3, _mm256_loadu_si256(x + 3)));
    sums[m] = _mm256_add_epi32(sums[m], _mm256_add_epi32(a, b));
  }
}

template <int ROWS>
inline void int4_step32(const uint8_t* w, const int16_t* xq, int64_t in, __m256i* sums) {
  const __m128i nibble = _mm_set1_epi16(15), v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i c0 = _mm_and_si128(v, nibble), c1 = _mm_and_si128(_mm_srli_epi16(v, 4), nibble),
                c2 = _mm_and_si128(_mm_srli_epi16(v, 8), nibble), c3 = _mm_srli_epi16(v, 12);
  for (int m = 0; m < ROWS; ++m) {
    const __m128i* x = reinterpret_cast<const __m128i*>(xq + m * in);
    const __m128i a =
        _mm_add_epi32(_mm_madd_epi16(c0, _mm_loadu_si128(x)), _mm_madd_epi16(c1, _mm_loadu_si128(x + 1)));
    const __m128i b =
        _mm_add_epi32(_mm_madd_epi16(c2, _mm_loadu_si128(x + 2)), _mm_madd_epi16(c3, _mm_loadu_si128(x + 3)));
    sums[m] = _mm256_add_epi32(sums[m], _mm256_zextsi128_si256(_mm_add_epi32(a, b)));
  }
}

// The totals of 8 groups' sums (each 8 lanes), in group order. Integers: exact in any order.
inline __m256i totals8(const __m256i* s) {
  __m256i v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_si256(s + i);
  const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}
#endif

constexpr int kInt4Tile = 8;  // int4, int8: rows of x per pass over a weight row (8 int sums + codes: 16 registers)

// y[m0 + m, o] = factor * the total of the float sums that the int8 and int4 kernels carry in `state` (8 lanes with
// AVX2, one float without).
template <int ROWS>
inline void store_totals(const Problem& p, int64_t m0, int64_t o, const float* state, float factor) {
  for (int m = 0; m < ROWS; ++m) {
#ifdef __AVX2__
    p.y[(m0 + m) * p.out + o] = hsum(_mm256_loadu_ps(state + m * kState)) * factor;
#else
    p.y[(m0 + m) * p.out + o] = state[m * kState] * factor;
#endif
  }
}

// `part` adds the groups of columns [k0, k1) (whole multiples of 8 groups but at the end) to the float sums in
// `state`; `finish` totals them.
template <int ROWS>
struct Int4Row {
  static constexpr int kTile = kInt4Tile;
  static const char* at(const Problem& p, int64_t o, int64_t k) {
    return reinterpret_cast<const char*>(p.w) + (o * p.in + k) / 2;
  }
  static void part(const Problem& p, int64_t m0, int64_t o, int64_t k0, int64_t k1, int64_t ahead, float* state);
  static void finish(const Problem& p, int64_t m0, int64_t o, const float* state) {
    store_totals<ROWS>(p, m0, o, state, 1.0f);
  }
};

template <int ROWS>
void Int4Row<ROWS>::part(const Problem& p, int64_t m0, int64_t o, int64_t k0, int64_t k1, int64_t ahead,
                         float* state) {
  const int64_t groups = p.in / p.group, groups8 = (groups + 7) / 8 * 8, step = int4_step(p.group);
  const uint16_t* sz = p.scale_zero + 2 * groups * o;  // scale_zero: [out, groups, 2]
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + o * (p.in / 2);
  const int16_t* xq = chunk_of(p.xq, p, m0, k0);
  const int64_t ld = std::min(p.chunk, p.in - k0);
#ifdef __AVX2__
  // 8 groups at a time: each group's 8-lane sums are kept, then the 8 are totalled and scaled in float vectors.
  __m256 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm256_loadu_ps(state + m * kState);
  for (int64_t g8 = k0 / p.group; g8 < k1 / p.group; g8 += 8) {
    __m256i sums_of[ROWS][8];
    for (int64_t g = g8; g < g8 + 8; ++g) {
      __m256i sums[ROWS];
      for (int m = 0; m < ROWS; ++m) sums[m] = _mm256_setzero_si256();
      for (int64_t k = g * p.group; g < groups && k < (g + 1) * p.group; k += step) {
        if (step == 64)
          int4_step64<ROWS>(w + k / 2, xq + (k - k0), ld, ahead, sums);
        else
          int4_step32<ROWS>(w + k / 2, xq + (k - k0), ld, sums);
      }
      for (int m = 0; m < ROWS; ++m) sums_of[m][g - g8] = sums[m];
    }
    // The 8 groups' (scale, zero) bf16 pairs: a 32-bit lane each, the scale in its low half. Past the last group:
    // zeros (x's scales and sums are zero there too, and so are the sums above).
    uint16_t tail[16] = {};
    const uint16_t* pairs = sz + 2 * g8;
    if (g8 + 8 > groups) pairs = static_cast<const uint16_t*>(std::memcpy(tail, pairs, 4 * (groups - g8)));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
    const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8), scale, zero);
    for (int m = 0; m < ROWS; ++m) {
      const float* xs = p.xscale + (m0 + m) * groups8 + g8;
      const float* sums = p.group_sums + (m0 + m) * groups8 + g8;
      const __m256 total = _mm256_cvtepi32_ps(totals8(sums_of[m]));
      acc[m] = _mm256_fmadd_ps(total, _mm256_mul_ps(scale, _mm256_loadu_ps(xs)), acc[m]);
      acc[m] = _mm256_fmadd_ps(offset, _mm256_loadu_ps(sums), acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm256_storeu_ps(state + m * kState, acc[m]);
#else
  (void)ahead;
  for (int m = 0; m < ROWS; ++m) {
    for (int64_t g = k0 / p.group; g < k1 / p.group; ++g) {
      int32_t total = 0;
      for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 4) {  // a word of codes: columns k .. k + 3
        const uint16_t word = uint16_t(w[k / 2] | (w[k / 2 + 1] << 8));
        const int16_t* x = xq + m * ld + (k / step * step - k0) + (k % step) / 4;
        for (int run = 0; run < 4; ++run) total += ((word >> (4 * run)) & 15) * x[run * (step / 4)];
      }
      const float scale = bf16_to_float(sz[2 * g]), zero = bf16_to_float(sz[2 * g + 1]);
      state[m * kState] += float(total) * scale * p.xscale[(m0 + m) * groups8 + g];
      state[m * kState] += (zero - 8 * scale) * p.group_sums[(m0 + m) * groups8 + g];
    }
  }
#endif
}

// int8: y = scale_o * sum_g xscale_g (q . xq)_g, with x quantized to int16 per group of kInt8Group columns as for
// int4 (the last group may be shorter) and q widened to int16: a group's products add up exactly in int32 (madd; 128
// columns * 128 * 32767 fits), and only its total is converted to float. Converting every weight to float and
// multiplying in float took about three times the instructions a weight: 8 rows went from 35 to 45 G products/s on
// the 2-core AMD host; one row reads the weights at about the same rate either way (~18 G/s of the ~22 it reads).
constexpr int64_t kInt8Group = 128;

#ifdef __AVX2__
template <int ROWS>
inline void int8_step32(const int8_t* w, const int16_t* xq, int64_t ld, int64_t ahead, __m256i* sums) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + ahead, _MM_HINT_T0);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
  const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
  for (int m = 0; m < ROWS; ++m) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xq + m * ld);
    sums[m] = _mm256_add_epi32(sums[m], _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(x)),
                                                         _mm256_madd_epi16(hi, _mm256_loadu_si256(x + 1))));
  }
}

template <int ROWS>
inline void int8_step16(const int8_t* w, const int16_t* xq, int64_t ld, __m256i* sums) {
  const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  for (int m = 0; m < ROWS; ++m)
    sums[m] = _mm256_add_epi32(
        sums[m], _mm256_madd_epi16(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * ld))));
}
#endif

template <int ROWS>
struct Int8Row {
  static constexpr int kTile = kInt4Tile;
  static const char* at(const Problem& p, int64_t o, int64_t k) {
    return static_cast<const char*>(p.w) + o * p.in + k;
  }
  static void part(const Problem& p, int64_t m0, int64_t o, int64_t k0, int64_t k1, int64_t ahead, float* state);
  static void finish(const Problem& p, int64_t m0, int64_t o, const float* state) {
    store_totals<ROWS>(p, m0, o, state, p.scale[o]);
  }
};

template <int ROWS>
void Int8Row<ROWS>::part(const Problem& p, int64_t m0, int64_t o, int64_t k0, int64_t k1, int64_t ahead,
                         float* state) {
  const int64_t groups = (p.in + kInt8Group - 1) / kInt8Group, groups8 = (groups + 7) / 8 * 8;
  const int8_t* w = static_cast<const int8_t*>(p.w) + o * p.in;
  const int16_t* xq = chunk_of(p.xq, p, m0, k0);
  const int64_t ld = std::min(p.chunk, p.in - k0);
#ifdef __AVX2__
  __m256 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm256_loadu_ps(state + m * kState);
  for (int64_t g8 = k0 / kInt8Group; g8 * kInt8Group < k1; g8 += 8) {
    __m256i sums_of[ROWS][8];
    for (int64_t g = g8; g < g8 + 8; ++g) {
      __m256i sums[ROWS];
      for (int m = 0; m < ROWS; ++m) sums[m] = _mm256_setzero_si256();
      const int64_t end = std::min(p.in, (g + 1) * kInt8Group);  // past the last group: no columns
      int64_t k = g * kInt8Group;
      for (; k + 32 <= end; k += 32) int8_step32<ROWS>(w + k, xq + (k - k0), ld, ahead, sums);
      for (; k + 16 <= end; k += 16) int8_step16<ROWS>(w + k, xq + (k - k0), ld, sums);
      for (int m = 0; m < ROWS && k < end; ++m) {
        int32_t rest = 0;
        for (int64_t j = k; j < end; ++j) rest += int32_t(w[j]) * xq[m * ld + (j - k0)];
        sums[m] = _mm256_add_epi32(sums[m], _mm256_setr_epi32(rest, 0, 0, 0, 0, 0, 0, 0));
      }
      for (int m = 0; m < ROWS; ++m) sums_of[m][g - g8] = sums[m];
    }
    for (int m = 0; m < ROWS; ++m) {
      const __m256 total = _mm256_cvtepi32_ps(totals8(sums_of[m]));
      acc[m] = _mm256_fmadd_ps(total, _mm256_loadu_ps(p.xscale + (m0 + m) * groups8 + g8), acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm256_storeu_ps(state + m * kState, acc[m]);
#else
  (void)ahead;
  for (int m = 0; m < ROWS; ++m) {
    for (int64_t g = k0 / kInt8Group; g * kInt8Group < k1; ++g) {
      int32_t total = 0;
      for (int64_t k = g * kInt8Group; k < std::min(p.in, (g + 1) * kInt8Group); ++k)
        total += int32_t(w[k]) * xq[m * ld + (k - k0)];
      state[m * kState] += float(total) * p.xscale[(m0 + m) * groups8 + g];
    }
  }
#endif
}

// Row<n> for a tile of n rows (1 <= n <= N): the row functions are compiled for each count.
template <template <int> class Row, int N>
inline void part_of_tile(int64_t n, const Problem& p, int64_t m0, int64_t o, int64_t k0, int64_t k1, int64_t ahead,
                         float* state) {
  if constexpr (N > 1) {
    if (n < N) return part_of_tile<Row, N - 1>(n, p, m0, o, k0, k1, ahead, state);
  }
  Row<N>::part(p, m0, o, k0, k1, ahead, state);
}

template <template <int> class Row, int N>
inline void finish_tile(int64_t n, const Problem& p, int64_t m0, int64_t o, const float* state) {
  if constexpr (N > 1) {
    if (n < N) return finish_tile<Row, N - 1>(n, p, m0, o, state);
  }
  Row<N>::finish(p, m0, o, state);
}

// Bytes from where the chunk [k0, ...) of weight row o starts to what the prefetches fetch meanwhile: the weights
// kPrefetch bytes on in the same row when rows are taken whole, else the same chunk kPrefetchRows rows on in the
// order the block is read.
template <template <int> class Row>
int64_t prefetch_ahead(const Problem& p, int64_t o, int64_t o0, int64_t o1, int64_t k0) {
  if (p.chunk == p.in) return kPrefetch;
  int64_t row = o + kPrefetchRows, k = k0;
  if (row >= o1 && k0 + p.chunk < p.in) row -= o1 - o0, k += p.chunk;
  if (row >= p.out) return kPrefetch;
  return Row<1>::at(p, row, k) - Row<1>::at(p, o, k0);
}

// The weight rows [begin, end), kBlock at a time: each chunk of columns for every row of the block and every tile
// of rows of x, the sums carried in `state` from chunk to chunk.
template <template <int> class Row>
void run_block(const Problem& p, int64_t begin, int64_t end) {
  constexpr int tile = Row<1>::kTile;
  std::vector<float> state(kBlock * p.rows * kState);
  for (int64_t o0 = begin; o0 < end; o0 += kBlock) {
    const int64_t o1 = std::min(end, o0 + kBlock);
    std::fill(state.begin(), state.end(), 0.0f);
    for (int64_t k0 = 0; k0 < p.in; k0 += p.chunk) {
      const int64_t k1 = std::min(p.in, k0 + p.chunk);
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t ahead = prefetch_ahead<Row>(p, o, o0, o1, k0);
        for (int64_t m0 = 0; m0 < p.rows; m0 += tile) {
          float* s = state.data() + ((o - o0) * p.rows + m0) * kState;
          part_of_tile<Row, tile>(std::min<int64_t>(tile, p.rows - m0), p, m0, o, k0, k1, ahead, s);
        }
      }
    }
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t m0 = 0; m0 < p.rows; m0 += tile)
        finish_tile<Row, tile>(std::min<int64_t>(tile, p.rows - m0), p, m0, o,
                               state.data() + ((o - o0) * p.rows + m0) * kState);
  }
}

// Splits the outputs into `threads` slices of whole blocks, one per OpenMP thread. OpenMP, not threads of our own:
// the library links the libgomp PyTorch has loaded, so these run on PyTorch's workers, which otherwise keep spinning
// for a while after each of its parallel operations and take the cores (that halved the speed on 2 cores).
template <template <int> class Row>
void run(const Problem& p, int threads) {
  const int64_t blocks = (p.out + kBlock - 1) / kBlock;
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = blocks * t / threads * kBlock, end = std::min(p.out, blocks * (t + 1) / threads * kBlock);
    run_block<Row>(p, begin, end);
  }
}

// x packed for `chunk` columns at a time, in `buffer`; x itself when that is the same layout.
const float* packed(const float* x, int64_t rows, int64_t in, int64_t chunk, std::vector<float>& buffer) {
  if (chunk == in) return x;
  buffer.resize(rows * in);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < in; ++k) buffer[packed_at(m, k, rows, in, chunk)] = x[m * in + k];
  return buffer.data();
}

// x in int16 for the int8 and int4 kernels (`quantized`).
struct QuantizedX {
  std::vector<int16_t> xq;
  std::vector<float> scale, sums;  // [rows, groups rounded up to 8]
};

// The largest magnitude and the sum of x[begin, end).
inline void largest_and_sum(const float* x, int64_t begin, int64_t end, float& largest, float& sum) {
  largest = 0, sum = 0;
  int64_t k = begin;
#ifdef __AVX2__
  __m256 top = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (; k + 8 <= end; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v));
    total = _mm256_add_ps(total, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  for (float lane : lanes) largest = std::max(largest, lane);
  sum = hsum(total);
#endif
  for (; k < end; ++k) {
    largest = std::max(largest, std::fabs(x[k]));
    sum += x[k];
  }
}

// x quantized to int16 per group of `group` columns (the last may be shorter), steps of 2^-15 of the group's largest
// magnitude; packed for `chunk` columns at a time, in the codes' column order for int4 (`int4_step`: 32 or 64) or in
// x's own (0). With each group's scale and sum (in float), zero past the last group.
QuantizedX quantized(const float* x, int64_t rows, int64_t in, int64_t group, int64_t chunk, int64_t int4_step) {
  const int64_t groups = (in + group - 1) / group, groups8 = (groups + 7) / 8 * 8;
  QuantizedX q{std::vector<int16_t>(rows * in), std::vector<float>(rows * groups8),
               std::vector<float>(rows * groups8)};
  for (int64_t m = 0; m < rows; ++m) {
    const float* from = x + m * in;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * group, end = std::min(in, begin + group);
      float largest, sum;
      largest_and_sum(from, begin, end, largest, sum);
      const float inverse = largest > 0 ? 32767 / largest : 0;
      q.scale[m * groups8 + g] = largest / 32767;
      q.sums[m * groups8 + g] = sum;
      // A group lies in one chunk: x's column k goes to q.xq[at + k] (`packed_at`, without a division a column).
      const int64_t k0 = begin / chunk * chunk, at = k0 * rows + m * std::min(chunk, in - k0) - k0;
      if (int4_step == 0) {
        int64_t k = begin;
#ifdef __AVX2__
        // _mm256_cvtps_epi32 rounds as std::lrint does (to nearest, ties to even, the default rounding mode).
        for (; k + 8 <= end; k += 8) {
          const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(from + k), _mm256_set1_ps(inverse)));
          const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q.xq.data() + at + k), words);
        }
#endif
        for (; k < end; ++k) q.xq[at + k] = int16_t(std::lrint(from[k] * inverse));
        continue;
      }
      const int64_t run = int4_step / 4;  // the columns of one nibble position in a step (`kNibbleRun`)
      for (int64_t step = begin; step < end; step += int4_step)
        for (int c = 0; c < 4; ++c)
          for (int64_t j = 0; j < run; ++j)
            q.xq[at + step + kNibbleRun[c] * run + j] = int16_t(std::lrint(from[step + 4 * j + c] * inverse));
    }
  }
  return q;
}

}  // namespace

extern "C" {

void int8_matmul(const float* x, int64_t rows, int64_t in, const int8_t* q, const float* scale, int64_t out, float* y,
                 int threads) {
  const int64_t chunk = chunk_columns(rows, in, 2, 8 * kInt8Group);
  const QuantizedX xq = quantized(x, rows, in, kInt8Group, chunk, 0);
  Problem p{};
  p.rows = rows, p.in = in, p.out = out, p.w = q, p.scale = scale, p.xq = xq.xq.data(), p.xscale = xq.scale.data();
  p.y = y, p.chunk = chunk;
  run<Int8Row>(p, threads);
}

void int4_matmul(const float* x, int64_t rows, int64_t in, const uint8_t* codes, const uint16_t* scale_zero,
                 int64_t group, int64_t out, float* y, int threads) {
  const int64_t chunk = chunk_columns(rows, in, 2, 8 * group);
  const QuantizedX xq = quantized(x, rows, in, group, chunk, int4_step(group));
  Problem p{};
  p.rows = rows, p.in = in, p.out = out, p.w = codes, p.scale_zero = scale_zero, p.group_sums = xq.sums.data();
  p.group = group, p.xq = xq.xq.data(), p.xscale = xq.scale.data(), p.y = y, p.chunk = chunk;
  run<Int4Row>(p, threads);
}

void bf16_matmul(const float* x, int64_t rows, int64_t in, const uint16_t* w, int64_t out, float* y, int threads) {
  const int64_t chunk = chunk_columns(rows, in, 4, 32);
  std::vector<float> buffer;
  Problem p{};
  p.x = x, p.xp = packed(x, rows, in, chunk, buffer), p.rows = rows, p.in = in, p.out = out, p.w = w, p.y = y;
  p.chunk = chunk;
  run<Bf16Row>(p, threads);
}

}  // extern "C"
