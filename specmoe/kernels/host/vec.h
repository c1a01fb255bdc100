// The vector unit of one build (AVX-512, AVX2 or portable scalar: VL floats), the weight loaders of every
// format the host kernels read, and the matrix descriptor (`Mat`). Included by experts.cpp only.

#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#if defined(ISA_AVX512) || defined(ISA_AVX2)
#include <immintrin.h>
#endif

enum { F_FP32 = 0, F_BF16 = 1, F_FP16 = 2, F_INT8 = 3, F_INT4 = 4, F_MXFP4 = 5, F_FP8 = 6, F_GPTQ = 7 };
// A_SWIGLU_OAI: gpt-oss's gate, gate/up rows interleaved (2j gate, 2j + 1 up), clamped at `limit`:
// (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
enum { A_SILU = 0, A_GELU = 1, A_GELU_TANH = 2, A_SWIGLU_OAI = 3 };
enum { B_NONE = 0, B_FP32 = 1, B_BF16 = 2, B_FP16 = 3 };  // bias dtypes

static inline float half_to_float(uint16_t h) {
#if defined(ISA_AVX512) || defined(ISA_AVX2)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// One weight matrix of one expert, as the store holds it.
// Publishers' formats (specmoe/kernels/prequant.py), as the store holds them:
//   mxfp4: w = _blocks [N, K/32, 16] (e2m1 codes, even column in the low nibble), scale = _scales uint8
//     [N, K/32] (e8m0: 2^(s - 127)); row_bytes K/2, groups K/32
//   fp8: w = e4m3 [N, K], scale = _scale_inv float32 [ceil(N/B), ceil(K/B)]; row_bytes K, groups ceil(K/B)
//   gptq: w = qweight int32 [K/8, N], scale = scales float16 [K/G, N], zero = qzeros int32 [K/G, N/8], aux =
//     g_idx int32 [K]; W[n, k] = (q - z[g_idx[k], n] - 1) * s[g_idx[k], n]; row_bytes 4N (one packed row of
//     qweight to the next), groups N
struct Mat {
    const uint8_t* w;      // row-major weights / codes (gptq: qweight)
    const void* scale;     // int8: float32 [N]; int4: float16 [N, groups]; see above for the others
    const uint16_t* zero;  // int4: float16 [N, groups]; gptq: qzeros (int32 words)
    int64_t row_bytes;     // bytes from one row of w to the next
    int64_t groups;        // int4: scale/zero entries per row; see above
    const void* aux;       // gptq: g_idx
    const void* bias;      // [N] added to the matrix's output (gpt-oss), or null
    int64_t bias_fmt;      // B_*
};

static inline float bias_at(const Mat& m, int64_t n) {
    if (m.bias_fmt == B_FP32) return ((const float*)m.bias)[n];
    if (m.bias_fmt == B_BF16) return bf16_to_float(((const uint16_t*)m.bias)[n]);
    if (m.bias_fmt == B_FP16) return half_to_float(((const uint16_t*)m.bias)[n]);
    return 0.0f;
}

// e8m0 scale byte -> 2^(s - 127) (s = 0: the subnormal 2^-127; 255, NaN in OCP MX, reads as +inf)
static inline float e8m0_to_float(uint8_t s) {
    uint32_t bits = s ? (uint32_t)s << 23 : 0x00400000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// e4m3 (fn) as the float16 with the same sign, exponent field and mantissa bits: exactly the e4m3 value times
// 2^-8 (its exponent bias is 7, float16's 15; e4m3 subnormals become float16 subnormals). Multiply by 256.
static inline uint16_t fp8_as_half(uint8_t b) { return (uint16_t)(((b & 0x80) << 8) | ((b & 0x7f) << 7)); }
static inline float fp8_to_float(uint8_t b) { return half_to_float(fp8_as_half(b)) * 256.0f; }

static const float FP4_VALUES[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// ---- the vector unit: VL floats ----------------------------------------------------------------------------
#if defined(ISA_AVX512)
#define VL 16
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf wload_fp32(const uint8_t* p) { return _mm512_loadu_ps((const float*)p); }
static inline vf wload_bf16(const uint8_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline vf wload_fp16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline vf wload_int8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
// 16 int4 codes (8 bytes) -> 16 floats in column order
static inline vf wload_int4(const uint8_t* p) {
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    const __m128i m = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}
// 16 e4m3 bytes -> 16 floats, times 2^-8 (fp8_as_half, vectorised)
static inline vf wload_fp8(const uint8_t* p) {
    __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)), 8);
    h = _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16((short)0xbfff));
    return _mm512_cvtph_ps(h);
}
#elif defined(ISA_AVX2)
#define VL 8
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline vf wload_fp32(const uint8_t* p) { return _mm256_loadu_ps((const float*)p); }
static inline vf wload_bf16(const uint8_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline vf wload_fp16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vf wload_int8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline vf wload_int4(const uint8_t* p) {  // 8 codes (4 bytes)
    int32_t raw;
    memcpy(&raw, p, 4);
    __m128i b = _mm_cvtsi32_si128(raw);
    const __m128i m = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}
static inline vf wload_fp8(const uint8_t* p) {  // 8 e4m3 bytes -> 8 floats, times 2^-8
    __m128i h = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)p)), 8);
    h = _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16((short)0xbfff));
    return _mm256_cvtph_ps(h);
}
#else
#define VL 1
typedef float vf;
static inline vf vzero() { return 0.0f; }
static inline vf vload(const float* p) { return *p; }
static inline vf vset1(float a) { return a; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline float vsum(vf a) { return a; }
static inline vf wload_fp32(const uint8_t* p) { float f; memcpy(&f, p, 4); return f; }
static inline vf wload_bf16(const uint8_t* p) { uint16_t b; memcpy(&b, p, 2); return bf16_to_float(b); }
static inline vf wload_fp16(const uint8_t* p) { uint16_t b; memcpy(&b, p, 2); return half_to_float(b); }
static inline vf wload_int8(const uint8_t* p) { return (float)(int8_t)*p; }
static inline vf wload_int4(const uint8_t* p) { return (float)(*p & 15); }  // one code at an even column
static inline vf wload_fp8(const uint8_t* p) { return half_to_float(fp8_as_half(*p)); }
#endif

// Rows per tile and tokens per pass: R * TB accumulators live in registers.
#if defined(ISA_AVX512)
#define R 4
#define TB 4
#elif defined(ISA_AVX2)
#define R 4
#define TB 2
#else
#define R 2
#define TB 2
#endif

// Scalar weight (column k of a row) for tails.
template <int FMT>
static inline float wscalar(const uint8_t* row, int64_t k) {
    if (FMT == F_FP32) { float f; memcpy(&f, row + 4 * k, 4); return f; }
    if (FMT == F_BF16) { uint16_t b; memcpy(&b, row + 2 * k, 2); return bf16_to_float(b); }
    if (FMT == F_FP16) { uint16_t b; memcpy(&b, row + 2 * k, 2); return half_to_float(b); }
    if (FMT == F_INT8) return (float)(int8_t)row[k];
    return (float)((row[k >> 1] >> ((k & 1) * 4)) & 15);
}

template <int FMT>
static inline vf wvec(const uint8_t* row, int64_t k) {
    if (FMT == F_FP32) return wload_fp32(row + 4 * k);
    if (FMT == F_BF16) return wload_bf16(row + 2 * k);
    if (FMT == F_FP16) return wload_fp16(row + 2 * k);
    if (FMT == F_INT8) return wload_int8(row + k);
#if VL == 1
    return wscalar<F_INT4>(row, k);
#else
    return wload_int4(row + (k >> 1));
#endif
}

