// Matrix products for decoding on the CPU: y[m, o] = sum_k x[m, k] * w[o, k] with w stored as int8 (one scale per
// output), int4 (two codes a byte, a scale and a zero point per group of inputs) or bf16, and x, y float32.
//
// Decoding reads every weight once per token, so these stream each weight row once for up to kTile rows of x and
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

constexpr int kTile = 2;       // rows of x multiplied together per pass over a weight row
constexpr int64_t kBlock = 16; // weight rows a thread takes at a time (int8 4096-wide: 64 KiB, stays in L2)

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

// 16 weights, in column order, as two vectors of 8.
inline void load16(const int8_t* w, int64_t k, __m256& a, __m256& b) {
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8))));
}
inline void load16(const uint16_t* w, int64_t k, __m256& a, __m256& b) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}
#endif

inline float weight_at(const int8_t* w, int64_t k) { return float(w[k]); }
inline float weight_at(const uint16_t* w, int64_t k) { return bf16_to_float(w[k]); }

// dot[m] = sum_k x[m, k] * w[k] for m < ROWS (int8 or bf16 w). Each row keeps four sums in flight (32 columns a
// step), so the adds' latency does not limit one row; two rows fit the 16 vector registers. A row is summed in the
// same order however many rows come with it.
template <int ROWS, typename W>
inline void row_dot(const float* x, int64_t in, const W* w, float* dot) {
  int64_t k = 0;
#ifdef __AVX2__
  __m256 acc[ROWS][4];
  for (int m = 0; m < ROWS; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_setzero_ps();
  for (; k + 32 <= in; k += 32) {
    __m256 wv[4];
    load16(w, k, wv[0], wv[1]);
    load16(w, k + 16, wv[2], wv[3]);
    for (int m = 0; m < ROWS; ++m)
      for (int v = 0; v < 4; ++v)
        acc[m][v] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + m * in + k + 8 * v), acc[m][v]);
  }
  for (int m = 0; m < ROWS; ++m)
    dot[m] = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
#else
  for (int m = 0; m < ROWS; ++m) dot[m] = 0;
#endif
  for (; k < in; ++k) {  // the rest (or everything, without AVX2)
    const float wf = weight_at(w, k);
    for (int m = 0; m < ROWS; ++m) dot[m] += wf * x[m * in + k];
  }
}

struct Problem {
  const float* x;  // [rows, in] (int8, bf16)
  int64_t rows, in, out;
  const void* w;              // int8 [out, in] | uint8 [out, in / 2] | bf16 [out, in]
  const float* scale;         // int8: [out]
  const uint16_t* scale_zero; // int4: bf16 [out, in / group, 2]
  const float* group_sums;    // int4: [rows, in / group], the sum of x over each group (exact, in float)
  int64_t group;              // int4: a multiple of 32
  const int16_t* xq;          // int4: x in int16, [rows, in], each 32 columns as their even then their odd ones
  const float* xscale;        // int4: [rows, in / group], x ~ xq * xscale
  float* y;                   // [rows, out]
};

template <int ROWS>
void int8_row(const Problem& p, const float* x, int64_t m0, int64_t o) {
  float dot[ROWS];
  row_dot<ROWS>(x, p.in, static_cast<const int8_t*>(p.w) + o * p.in, dot);
  for (int m = 0; m < ROWS; ++m) p.y[(m0 + m) * p.out + o] = dot[m] * p.scale[o];
}

template <int ROWS>
void bf16_row(const Problem& p, const float* x, int64_t m0, int64_t o) {
  float dot[ROWS];
  row_dot<ROWS>(x, p.in, static_cast<const uint16_t*>(p.w) + o * p.in, dot);
  for (int m = 0; m < ROWS; ++m) p.y[(m0 + m) * p.out + o] = dot[m];
}

// w = (q - 8) * scale + zero per group, so y = sum_g scale_g (q . x)_g + sum_g (zero_g - 8 scale_g) * sum_g(x).
// (q . x)_g takes x quantized to int16 with one scale per group (`xq`, `xscale`: steps of 2^-15 of the group's
// largest value, finer than bf16's), so a group's products add up exactly in integers (madd, then adds: 128 * 15 *
// 32767 fits in int32) and only the group's sum is converted to float and scaled. (chatglm.cpp quantizes x to int8
// in blocks of 32; that took the int4 logits' error on a tiny model from 31% to 40% of an adapter's effect.) Each
// 32 columns of x are laid out as their 16 even columns, then their 16 odd ones, the order the nibbles unpack in.
template <int ROWS>
void int4_row(const Problem& p, const float*, int64_t m0, int64_t o) {
  const int64_t groups = p.in / p.group, per_group = p.group / 32;  // 32 columns (16 bytes of codes) a step
  const uint16_t* sz = p.scale_zero + 2 * groups * o;                 // scale_zero: [out, groups, 2]
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + o * (p.in / 2);
  const int16_t* xq = p.xq + m0 * p.in;
  const float* xs = p.xscale + m0 * groups;
  float dot[ROWS];
#ifdef __AVX2__
  __m256 acc[ROWS][2];
  for (int m = 0; m < ROWS; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const __m128i nibble = _mm_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[ROWS];
    for (int m = 0; m < ROWS; ++m) sums[m] = _mm256_setzero_si256();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * b));
      const __m256i even = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), nibble));
      const __m256i odd = _mm256_cvtepu8_epi16(_mm_and_si128(v, nibble));
      for (int m = 0; m < ROWS; ++m) {
        const __m256i* x = reinterpret_cast<const __m256i*>(xq + m * p.in + 32 * b);
        sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(even, _mm256_loadu_si256(x)));
        sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(odd, _mm256_loadu_si256(x + 1)));
      }
    }
    const float scale = bf16_to_float(sz[2 * g]);
    for (int m = 0; m < ROWS; ++m)  // two float sums in flight per row
      acc[m][g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), _mm256_set1_ps(scale * xs[m * groups + g]),
                                      acc[m][g & 1]);
  }
  for (int m = 0; m < ROWS; ++m) dot[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
#else
  for (int m = 0; m < ROWS; ++m) dot[m] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (int m = 0; m < ROWS; ++m) {
      int32_t sum = 0;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b)
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = w[16 * b + j];
          sum += (byte >> 4) * xq[m * p.in + 32 * b + j] + (byte & 15) * xq[m * p.in + 32 * b + 16 + j];
        }
      dot[m] += float(sum) * bf16_to_float(sz[2 * g]) * xs[m * groups + g];
    }
  }
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = bf16_to_float(sz[2 * g]), offset = bf16_to_float(sz[2 * g + 1]) - 8 * scale;
    for (int m = 0; m < ROWS; ++m) dot[m] += offset * p.group_sums[(m0 + m) * groups + g];
  }
  for (int m = 0; m < ROWS; ++m) p.y[(m0 + m) * p.out + o] = dot[m];
}

template <template <int> class Row>
void run_block(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t o0 = begin; o0 < end; o0 += kBlock) {
    const int64_t o1 = std::min(end, o0 + kBlock);
    for (int64_t m0 = 0; m0 < p.rows; m0 += kTile) {
      const float* x = p.x + m0 * p.in;
      for (int64_t o = o0; o < o1; ++o) {
        switch (std::min<int64_t>(kTile, p.rows - m0)) {
          case 2: Row<2>::run(p, x, m0, o); break;
          default: Row<1>::run(p, x, m0, o); break;
        }
      }
    }
  }
}

// `run_block` picks a row function by the number of rows in a tile; these wrap each kernel's for it.
template <int R>
struct Int8Row {
  static void run(const Problem& p, const float* x, int64_t m, int64_t o) { int8_row<R>(p, x, m, o); }
};
template <int R>
struct Int4Row {
  static void run(const Problem& p, const float* x, int64_t m, int64_t o) { int4_row<R>(p, x, m, o); }
};
template <int R>
struct Bf16Row {
  static void run(const Problem& p, const float* x, int64_t m, int64_t o) { bf16_row<R>(p, x, m, o); }
};

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

}  // namespace

extern "C" {

void int8_matmul(const float* x, int64_t rows, int64_t in, const int8_t* q, const float* scale, int64_t out, float* y,
                 int threads) {
  Problem p{x, rows, in, out, q, scale, nullptr, nullptr, 0, nullptr, nullptr, y};
  run<Int8Row>(p, threads);
}

void int4_matmul(const float* x, int64_t rows, int64_t in, const uint8_t* codes, const uint16_t* scale_zero,
                 int64_t group, int64_t out, float* y, int threads) {
  const int64_t groups = in / group;
  std::vector<int16_t> xq(rows * in);
  std::vector<float> xscale(rows * groups), group_sums(rows * groups);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* from = x + m * in + g * group;
      float largest = 0, sum = 0;
      for (int64_t k = 0; k < group; ++k) {
        largest = std::max(largest, std::fabs(from[k]));
        sum += from[k];
      }
      const float scale = largest / 32767, inverse = largest > 0 ? 32767 / largest : 0;
      xscale[m * groups + g] = scale;
      group_sums[m * groups + g] = sum;
      int16_t* to = xq.data() + m * in + g * group;
      for (int64_t k = 0; k < group; ++k)  // within each 32: the 16 even columns, then the 16 odd ones
        to[(k / 32) * 32 + (k % 2) * 16 + (k % 32) / 2] = int16_t(std::lrint(from[k] * inverse));
    }
  }
  Problem p{nullptr, rows, in, out, codes, nullptr, scale_zero, group_sums.data(), group, xq.data(), xscale.data(), y};
  run<Int4Row>(p, threads);
}

void bf16_matmul(const float* x, int64_t rows, int64_t in, const uint16_t* w, int64_t out, float* y, int threads) {
  Problem p{x, rows, in, out, w, nullptr, nullptr, nullptr, 0, nullptr, nullptr, y};
  run<Bf16Row>(p, threads);
}

}  // extern "C"
