// Matrix products for decoding on the CPU: y[m, o] = sum_k x[m, k] * w[o, k] with w stored as int8 (one scale per
// output), int4 (two codes a byte, a scale and a zero point per group of inputs) or bf16, and x, y float32.
//
// Decoding reads every weight once per token, so these stream each weight row once for up to kTile rows of x and
// keep the sums in registers (AVX2 + FMA where the compiler targets them, plain loops elsewhere). Every row of x is
// summed in the same order whatever the number of rows, so a batch gives each row the result it gets alone.
// chatglm_sft/models/cpu_kernels.py compiles this file on first use and calls it through ctypes.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// 16 weights as two vectors of 8: int8 and bf16 in column order; int4 (8 bytes) as the even columns (high nibbles)
// then the odd ones (low nibbles), which is why int4's x is permuted the same way before the call.
inline void load16(const int8_t* w, int64_t k, float, __m256& a, __m256& b) {
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8))));
}
inline void load16(const uint16_t* w, int64_t k, float, __m256& a, __m256& b) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}
inline void load16(const uint8_t* w, int64_t k, float scale, __m256& a, __m256& b) {  // int4 codes times the scale
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k / 2)));
  const __m256 s = _mm256_set1_ps(scale);
  a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s);
  b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), s);
}
#endif

// The weight at position j (0..15) of the 16 from column k, in the same order as `load16`.
inline float weight_at(const int8_t* w, int64_t k, int j, float) { return float(w[k + j]); }
inline float weight_at(const uint16_t* w, int64_t k, int j, float) { return bf16_to_float(w[k + j]); }
inline float weight_at(const uint8_t* w, int64_t k, int j, float scale) {
  const uint8_t byte = w[k / 2 + j % 8];
  return float(j < 8 ? byte >> 4 : byte & 15) * scale;
}

// dot[m] = sum_k x[m, k] * w[k] * scale(k) for m < ROWS, with `scale(k)` 1 except for int4 (its group's scale).
// Each row keeps four sums in flight (32 columns a step), so the adds' latency does not limit one row; two rows fit
// the 16 vector registers. A row is summed in the same order however many rows come with it.
template <int ROWS, typename W, typename Scale>
inline void row_dot(const float* x, int64_t in, const W* w, Scale scale, float* dot) {
  constexpr int kSteps = 2;  // 16 columns each
  constexpr int kAcc = 4;
  int64_t k = 0;
#ifdef __AVX2__
  __m256 acc[ROWS][kAcc];
  for (int m = 0; m < ROWS; ++m)
    for (int i = 0; i < kAcc; ++i) acc[m][i] = _mm256_setzero_ps();
  for (; k + 16 * kSteps <= in; k += 16 * kSteps) {
    const float s = scale(k);
    __m256 wv[2 * kSteps];
    for (int u = 0; u < kSteps; ++u) load16(w, k + 16 * u, s, wv[2 * u], wv[2 * u + 1]);
    for (int m = 0; m < ROWS; ++m)
      for (int v = 0; v < 2 * kSteps; ++v)
        acc[m][v % kAcc] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + m * in + k + 8 * v), acc[m][v % kAcc]);
  }
  for (int m = 0; m < ROWS; ++m) {
    __m256 sum = acc[m][0];
    for (int i = 1; i < kAcc; ++i) sum = _mm256_add_ps(sum, acc[m][i]);
    dot[m] = hsum(sum);
  }
#else
  for (int m = 0; m < ROWS; ++m) dot[m] = 0;
#endif
  for (; k < in; k += 16) {  // the rest (or everything, without AVX2): int4 rows are a multiple of 16 wide
    const float s = scale(k);
    for (int j = 0; j < 16 && k + j < in; ++j) {
      const float wf = weight_at(w, k, j, s);
      for (int m = 0; m < ROWS; ++m) dot[m] += wf * x[m * in + k + j];
    }
  }
}

struct Problem {
  const float* x;  // [rows, in]; for int4, each 16 columns as its 8 even then its 8 odd ones
  int64_t rows, in, out;
  const void* w;              // int8 [out, in] | uint8 [out, in / 2] | bf16 [out, in]
  const float* scale;         // int8: [out]
  const uint16_t* scale_zero; // int4: bf16 [in / group, out, 2] (PyTorch's layout; a block of rows shares lines)
  const float* group_sums;    // int4: [rows, in / group], the sum of x over each group
  int64_t group;  // int4: a power of two, at least 32
  float* y;  // [rows, out]
};

constexpr auto kNoScale = [](int64_t) { return 1.0f; };

template <int ROWS>
void int8_row(const Problem& p, const float* x, int64_t m0, int64_t o) {
  float dot[ROWS];
  row_dot<ROWS>(x, p.in, static_cast<const int8_t*>(p.w) + o * p.in, kNoScale, dot);
  for (int m = 0; m < ROWS; ++m) p.y[(m0 + m) * p.out + o] = dot[m] * p.scale[o];
}

template <int ROWS>
void bf16_row(const Problem& p, const float* x, int64_t m0, int64_t o) {
  float dot[ROWS];
  row_dot<ROWS>(x, p.in, static_cast<const uint16_t*>(p.w) + o * p.in, kNoScale, dot);
  for (int m = 0; m < ROWS; ++m) p.y[(m0 + m) * p.out + o] = dot[m];
}

// w = (q - 8) * scale + zero per group, so y = sum_k q_k scale_k x_k + sum_g (zero_g - 8 scale_g) * sum_g(x).
template <int ROWS>
void int4_row(const Problem& p, const float* x, int64_t m0, int64_t o) {
  const int64_t groups = p.in / p.group, stride = 2 * p.out;  // scale_zero is [groups, out, 2]
  const uint16_t* sz = p.scale_zero + 2 * o;
  const int shift = __builtin_ctzll(uint64_t(p.group));  // a power of two: a shift, not a division, per step
  float dot[ROWS];
  row_dot<ROWS>(x, p.in, static_cast<const uint8_t*>(p.w) + o * (p.in / 2),
                [sz, shift, stride](int64_t k) { return bf16_to_float(sz[(k >> shift) * stride]); }, dot);
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = bf16_to_float(sz[g * stride]), offset = bf16_to_float(sz[g * stride + 1]) - 8 * scale;
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

template <int R> struct Int8Row { static void run(const Problem& p, const float* x, int64_t m, int64_t o) { int8_row<R>(p, x, m, o); } };
template <int R> struct Int4Row { static void run(const Problem& p, const float* x, int64_t m, int64_t o) { int4_row<R>(p, x, m, o); } };
template <int R> struct Bf16Row { static void run(const Problem& p, const float* x, int64_t m, int64_t o) { bf16_row<R>(p, x, m, o); } };

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
  Problem p{x, rows, in, out, q, scale, nullptr, nullptr, 0, y};
  run<Int8Row>(p, threads);
}

void int4_matmul(const float* x, int64_t rows, int64_t in, const uint8_t* codes, const uint16_t* scale_zero,
                 const float* group_sums, int64_t group, int64_t out, float* y, int threads) {
  Problem p{x, rows, in, out, codes, nullptr, scale_zero, group_sums, group, y};
  run<Int4Row>(p, threads);
}

void bf16_matmul(const float* x, int64_t rows, int64_t in, const uint16_t* w, int64_t out, float* y, int threads) {
  Problem p{x, rows, in, out, w, nullptr, nullptr, nullptr, 0, y};
  run<Bf16Row>(p, threads);
}

}  // extern "C"
