// Routed experts of one MoE layer computed on the host, straight from the host store's bytes.
//
// out[t] += sum over routed pairs (t, e): w[t, e] * down_e @ (act(gate_e @ x[t]) * (up_e @ x[t]))
//
// Weights are read in the store's own format (no dequantized copy): fp32, bf16, fp16 [N, K] row-major, int8
// [N, K] with a float32 scale per row (W = q * s), int4 [N, Kp/2] (two codes per byte, even column in the low
// nibble) with float16 scale and zero per (row, group of G columns) (W = code * s + z), as
// specmoe/kernels/quant.py writes them. gate_up is [2I, H] (gate rows then up rows), down [H, I].
//
// Phases, one OpenMP team: (1) gate/up rows of every routed expert split over the threads by weight bytes,
// (2) activation, routing weight folded in, (3) down rows split over the threads (each thread owns output
// rows, so no atomics). Every weight byte is read once per call whatever the tokens: a tile of R rows is
// decoded into registers once per column step and multiplied with TB tokens at a time.
//
// Compiled three times (ISA_AVX512, ISA_AVX2, neither = portable scalar); the loader picks one at run time.

// Shape legend: T tokens, H hidden, I intermediate, n routed experts of this call, P routed pairs, K columns

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#if defined(ISA_AVX512) || defined(ISA_AVX2)
#include <immintrin.h>
#endif

enum { F_FP32 = 0, F_BF16 = 1, F_FP16 = 2, F_INT8 = 3, F_INT4 = 4 };
enum { A_SILU = 0, A_GELU = 1, A_GELU_TANH = 2 };

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
struct Mat {
    const uint8_t* w;      // row-major weights / codes
    const void* scale;     // int8: float32 [N]; int4: float16 [N, groups]
    const uint16_t* zero;  // int4: float16 [N, groups]
    int64_t row_bytes;     // bytes from one row of w to the next
    int64_t groups;        // int4: scale/zero entries per row
};

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

// One tile: rows [r, r + nr) (nr <= R) times NB tokens xs[0..NB) (fp32, zero beyond K up to a multiple of VL);
// res[i][j] = dot(M[r + i], xs[j]). int4: gsum[j] holds each token's sums over the K groups (zero term).
template <int FMT, int NB>
static inline void tile(const Mat& m, int64_t r, int nr, int64_t K, int group, const float* const* xs,
                        const float* const* gsum, float res[R][TB]) {
    const uint8_t* row[R];
    for (int i = 0; i < R; i++) row[i] = m.w + (r + (i < nr ? i : 0)) * m.row_bytes;
    const int64_t ahead = R * m.row_bytes;  // prefetch distance: the same column of the next tile's rows
    vf acc[R][NB];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = vzero();
#if defined(ISA_AVX512)
    if (FMT == F_INT4 && group % 32 == 0) {
        // a table of the group's 16 values (code * scale + zero, rounded as quant.dequantize rounds them) per
        // row; 16 bytes hold 32 codes: the low nibbles (even columns) and high nibbles (odd columns) index it
        // directly (vpermps reads the low 4 bits). x comes deinterleaved per 32 columns (even, then odd).
        const int64_t kv = (K + 31) / 32 * 32;
        const uint16_t* sc = (const uint16_t*)m.scale;
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int64_t g0 = 0, g = 0; g0 < kv; g0 += group, g++) {
            const int64_t gend = (g0 + group < kv) ? g0 + group : kv;
            __m512 lut[R];
            for (int i = 0; i < R; i++) {
                const int64_t rr = (r + (i < nr ? i : 0)) * m.groups + g;
                lut[i] = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(half_to_float(sc[rr]))),
                                       _mm512_set1_ps(half_to_float(m.zero[rr])));
            }
            for (int64_t k = g0; k < gend; k += 32) {
                __m512 xe[NB], xo[NB];
                for (int j = 0; j < NB; j++) { xe[j] = _mm512_loadu_ps(xs[j] + k); xo[j] = _mm512_loadu_ps(xs[j] + k + 16); }
                if (!(k & 127))  // the next tile's rows, 64 bytes at a time (their streams start cold)
                    for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + (k >> 1) + ahead), _MM_HINT_T0);
                for (int i = 0; i < R; i++) {
                    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row[i] + (k >> 1))));
                    const __m512 we = _mm512_permutexvar_ps(b, lut[i]);
                    const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut[i]);
                    for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(wo, xo[j], _mm512_fmadd_ps(we, xe[j], acc[i][j]));
                }
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) res[i][j] = vsum(acc[i][j]);
        return;
    }
#endif
#if defined(ISA_AVX2)
    if (FMT == F_INT4 && group % 16 == 0) {
        // 8 bytes widen to 8 lanes holding two codes each: the low nibbles (even columns) and high nibbles (odd
        // columns) multiply x deinterleaved per 16 columns; per group, the sum of code * x times the scale,
        // plus the zero times the group's sum of x
        const int64_t kv = (K + 15) / 16 * 16;
        const uint16_t* sc = (const uint16_t*)m.scale;
        const __m256i low = _mm256_set1_epi32(15);
        float zacc[R][NB];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) zacc[i][j] = 0.f;
        for (int64_t g0 = 0, g = 0; g0 < kv; g0 += group, g++) {
            const int64_t gend = (g0 + group < kv) ? g0 + group : kv;
            vf part[R][NB];
            for (int i = 0; i < R; i++)
                for (int j = 0; j < NB; j++) part[i][j] = vzero();
            for (int64_t k = g0; k < gend; k += 16) {
                if (!(k & 127))
                    for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + (k >> 1) + ahead), _MM_HINT_T0);
                vf xe[NB], xo[NB];
                for (int j = 0; j < NB; j++) { xe[j] = vload(xs[j] + k); xo[j] = vload(xs[j] + k + 8); }
                for (int i = 0; i < R; i++) {
                    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row[i] + (k >> 1))));
                    const vf we = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                    const vf wo = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                    for (int j = 0; j < NB; j++) part[i][j] = vfma(wo, xo[j], vfma(we, xe[j], part[i][j]));
                }
            }
            for (int i = 0; i < R; i++) {
                const int64_t rr = (r + (i < nr ? i : 0)) * m.groups + g;
                const vf sv = vset1(half_to_float(sc[rr]));
                const float z = half_to_float(m.zero[rr]);
                for (int j = 0; j < NB; j++) {
                    acc[i][j] = vfma(part[i][j], sv, acc[i][j]);
                    zacc[i][j] += z * gsum[j][g];
                }
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) res[i][j] = vsum(acc[i][j]) + zacc[i][j];
        return;
    }
#endif
    if (FMT == F_INT4) {
        // code * scale per group, multiplied with x; the zeros multiply each group's sum of x
        const int64_t kv = (K + VL - 1) / VL * VL;  // codes exist up to the padded K; x is zero there
        const uint16_t* sc = (const uint16_t*)m.scale;
        float zacc[R][NB];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) zacc[i][j] = 0.f;
        for (int64_t g0 = 0, g = 0; g0 < kv; g0 += group, g++) {
            const int64_t gend = (g0 + group < kv) ? g0 + group : kv;
            vf sv[R];
            for (int i = 0; i < R; i++) {
                const int64_t rr = (r + (i < nr ? i : 0)) * m.groups + g;
                sv[i] = vset1(half_to_float(sc[rr]));
                const float z = half_to_float(m.zero[rr]);
                for (int j = 0; j < NB; j++) zacc[i][j] += z * gsum[j][g];
            }
            for (int64_t k = g0; k < gend; k += VL) {
                vf xv[NB];
                for (int j = 0; j < NB; j++) xv[j] = vload(xs[j] + k);
                for (int i = 0; i < R; i++) {
                    const vf w = vmul(wvec<F_INT4>(row[i], k), sv[i]);
                    for (int j = 0; j < NB; j++) acc[i][j] = vfma(w, xv[j], acc[i][j]);
                }
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) res[i][j] = vsum(acc[i][j]) + zacc[i][j];
        return;
    }
    const int64_t kv = K / VL * VL;
    constexpr int64_t wb = FMT == F_FP32 ? 4 : (FMT == F_INT8 ? 1 : 2);  // bytes per weight
    for (int64_t k = 0; k < kv; k += VL) {
#if VL > 1
        if (!((k * wb) & 63))
            for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + k * wb + ahead), _MM_HINT_T0);
#endif
        vf xv[NB];
        for (int j = 0; j < NB; j++) xv[j] = vload(xs[j] + k);
        for (int i = 0; i < R; i++) {
            const vf w = wvec<FMT>(row[i], k);
            for (int j = 0; j < NB; j++) acc[i][j] = vfma(w, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++) {
        const float s = FMT == F_INT8 ? ((const float*)m.scale)[r + (i < nr ? i : 0)] : 1.0f;
        for (int j = 0; j < NB; j++) {
            float d = vsum(acc[i][j]);
            for (int64_t k = kv; k < K; k++) d += wscalar<FMT>(row[i], k) * xs[j][k];
            res[i][j] = d * s;
        }
    }
}

// ys[j][r] (+)= dot(M[r], xs[j]) for rows r in [r0, r1) and nt tokens.
template <int FMT>
static void rows_dot(const Mat& m, int64_t r0, int64_t r1, int64_t K, int group, const float* const* xs,
                     const float* const* gsum, int nt, float* const* ys, bool accumulate) {
    for (int64_t r = r0; r < r1; r += R) {
        const int nr = (int)((r1 - r) < R ? (r1 - r) : R);
        for (int t0 = 0; t0 < nt; t0 += TB) {
            const int nb = (nt - t0) < TB ? (nt - t0) : TB;
            float res[R][TB];
            const float* const* x = xs + t0;
            const float* const* gs = gsum + t0;
            switch (nb) {
                case 1: tile<FMT, 1>(m, r, nr, K, group, x, gs, res); break;
#if TB >= 2
                case 2: tile<FMT, 2>(m, r, nr, K, group, x, gs, res); break;
#endif
#if TB >= 4
                case 3: tile<FMT, 3>(m, r, nr, K, group, x, gs, res); break;
                case 4: tile<FMT, 4>(m, r, nr, K, group, x, gs, res); break;
#endif
            }
            for (int j = 0; j < nb; j++) {
                float* yr = ys[t0 + j] + r;
                for (int i = 0; i < nr; i++) yr[i] = accumulate ? yr[i] + res[i][j] : res[i][j];
            }
        }
    }
}

typedef void (*rows_fn)(const Mat&, int64_t, int64_t, int64_t, int, const float* const*, const float* const*, int,
                        float* const*, bool);

static rows_fn pick(int fmt) {
    switch (fmt) {
        case F_FP32: return rows_dot<F_FP32>;
        case F_BF16: return rows_dot<F_BF16>;
        case F_FP16: return rows_dot<F_FP16>;
        case F_INT8: return rows_dot<F_INT8>;
        case F_INT4: return rows_dot<F_INT4>;
    }
    return nullptr;
}

static inline float activate(float g, int act) {
    if (act == A_SILU) return g / (1.0f + expf(-g));
    if (act == A_GELU) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

// [lo, hi) of `total` items for thread `tid` of `nth`, in units of R rows
static inline void share(int64_t total, int tid, int nth, int64_t* lo, int64_t* hi) {
    int64_t tiles = (total + R - 1) / R;
    *lo = tiles * tid / nth * R;
    *hi = tiles * (tid + 1) / nth * R;
    if (*hi > total) *hi = total;
    if (*lo > total) *lo = total;
}

extern "C" {

const char* specmoe_host_isa() {
#if defined(ISA_AVX512)
    return "avx512";
#elif defined(ISA_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}

// Whether int4 reads x deinterleaved per 2 * VL columns (even columns, then odd: `lut_pos`): the AVX-512
// table path and the AVX2 path.
static inline bool int4_lut(int fmt, int group) {
#if defined(ISA_AVX512) || defined(ISA_AVX2)
    return fmt == F_INT4 && group % (2 * VL) == 0;
#else
    (void)fmt; (void)group;
    return false;
#endif
}

static inline int64_t lut_pos(int64_t j) {
    const int64_t c = j % (2 * VL);
    return (j - c) + ((c & 1) ? VL + (c >> 1) : (c >> 1));
}

static inline int64_t padded_inter(int64_t I, int group) {
    const int64_t q = group > 128 ? group : 128;
    return (I + q - 1) / q * q;
}

// Scratch floats `specmoe_host_experts` needs for P routed pairs (the caller allocates it once and reuses it).
int64_t specmoe_host_scratch(int64_t P, int64_t Hx, int64_t I, int group) {
    const int64_t ip = padded_inter(I, group);
    return P * (2 * I + ip + 3 + Hx / group + ip / group + Hx);
}

// Returns 0 on success, a negative code on bad arguments.
//   fmt, act, group: weight format (F_*), activation (A_*), int4 group size (columns per scale; any power of
//     two >= 16 for the other formats)
//   x: [T, Hx] float32, zero from column H to Hx (Hx a multiple of the group and of 64)
//   ids: [T, k] int64 routed expert ids; wts: [T, k] float32 routing weights
//   chosen: [n] expert ids this call computes; gate_up / down: [n] matrices of those experts ([2I, H], [H, I])
//   out: [T, H] float32, accumulated into
//   scratch: specmoe_host_scratch(T * k, Hx, I, group) floats
int specmoe_host_experts(int fmt, int act, int group, int64_t T, int64_t H, int64_t I, int64_t Hx, const float* x,
                         int64_t k, const int64_t* ids, const float* wts, int64_t n, const int64_t* chosen,
                         const Mat* gate_up, const Mat* down, float* out, float* scratch, int threads) {
    rows_fn fn = pick(fmt);
    if (!fn || T < 0 || k < 1 || H <= 0 || I <= 0 || n < 0 || threads < 1) return -1;
    if (group < 16 || (group & (group - 1)) || Hx < H || Hx % group || Hx % 64) return -2;
    const int64_t P = T * k, ip = padded_inter(I, group), ngx = Hx / group, nga = ip / group;
    float* gu = scratch;                   // [P, 2I] gate/up before the activation, pairs grouped by expert
    float* a = gu + P * 2 * I;             // [P, ip] activations * routing weight, zero beyond I
    float* pw = a + P * ip;                // [P] routing weight of each grouped pair
    int64_t* ptok = (int64_t*)(pw + P);    // [P] token of each grouped pair
    float* gx = (float*)(ptok + P);        // [P, ngx] int4: sums of x over H's groups
    float* ga = gx + P * ngx;              // [P, nga] int4: sums of the activations over I's groups
    float* xd = ga + P * nga;              // [T, Hx] int4 table path: x deinterleaved
    const bool lut = int4_lut(fmt, group);
#if defined(ISA_AVX512)
    const bool need_gsum = fmt == F_INT4 && !lut;
#else
    const bool need_gsum = fmt == F_INT4;
#endif
    // group the routed pairs by chosen expert: expert i owns pairs [off[i], off[i + 1])
    int64_t off[n + 1];
    int64_t p = 0;
    for (int64_t i = 0; i < n; i++) {
        off[i] = p;
        for (int64_t q = 0; q < P; q++)
            if (ids[q] == chosen[i]) { ptok[p] = q / k; pw[p] = wts[q]; p++; }
    }
    off[n] = p;
    if (p == 0) return 0;
    const float* xs[p];   // input row of each pair
    const float* as[p];   // activation row of each pair
    const float* gxs[p];  // group sums of each pair's input / activation
    const float* gas[p];
    float* gs[p];         // gate/up row of each pair
    float* os[p];         // output row of each pair's token
    for (int64_t q = 0; q < p; q++) {
        xs[q] = (lut ? xd : x) + ptok[q] * Hx; as[q] = a + q * ip; gs[q] = gu + q * 2 * I; os[q] = out + ptok[q] * H;
        gxs[q] = gx + q * ngx; gas[q] = ga + q * nga;
    }
    int64_t rows1 = 0;  // phase 1 work: every chosen expert's 2I rows, flattened, split evenly
    for (int64_t i = 0; i < n; i++) if (off[i + 1] > off[i]) rows1 += 2 * I;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t plo = p * tid / nt, phi = p * (tid + 1) / nt;
        int64_t lo, hi;
        if (lut) {
            for (int64_t t = T * tid / nt; t < T * (tid + 1) / nt; t++)
                for (int64_t c = 0; c < Hx; c++) xd[t * Hx + lut_pos(c)] = x[t * Hx + c];
        }
        if (need_gsum) {  // from x in column order (the group sums do not depend on the order within a group)
            for (int64_t q = plo; q < phi; q++)
                for (int64_t g = 0; g < ngx; g++) {
                    float s = 0.f;
                    for (int64_t c = g * group; c < (g + 1) * group; c++) s += x[ptok[q] * Hx + c];
                    gx[q * ngx + g] = s;
                }
        }
        if (lut || need_gsum) {
#pragma omp barrier
        }
        // (1) gate/up
        share(rows1, tid, nt, &lo, &hi);
        int64_t base = 0;
        for (int64_t i = 0; i < n && lo < hi; i++) {
            const int64_t np = off[i + 1] - off[i];
            if (!np) continue;
            const int64_t s = lo > base ? lo - base : 0, e = hi - base < 2 * I ? hi - base : 2 * I;
            if (s < e) fn(gate_up[i], s, e, H, group, xs + off[i], gxs + off[i], (int)np, gs + off[i], false);
            base += 2 * I;
        }
#pragma omp barrier
        // (2) activation * up * routing weight, zero padding, group sums
        for (int64_t q = plo; q < phi; q++) {
            const float* g = gu + q * 2 * I;
            float* aq = a + q * ip;
            if (lut) {
                for (int64_t j = 0; j < I; j++) aq[lut_pos(j)] = activate(g[j], act) * g[I + j] * pw[q];
                for (int64_t j = I; j < ip; j++) aq[lut_pos(j)] = 0.f;
            } else {
                for (int64_t j = 0; j < I; j++) aq[j] = activate(g[j], act) * g[I + j] * pw[q];
                for (int64_t j = I; j < ip; j++) aq[j] = 0.f;
            }
            if (need_gsum)
                for (int64_t g2 = 0; g2 < nga; g2++) {
                    float s = 0.f;
                    for (int64_t c = g2 * group; c < (g2 + 1) * group; c++) s += aq[c];
                    ga[q * nga + g2] = s;
                }
        }
#pragma omp barrier
        // (3) down: this thread's output rows, every expert (one expert's pairs are distinct tokens)
        share(H, tid, nt, &lo, &hi);
        for (int64_t i = 0; i < n && lo < hi; i++) {
            const int64_t np = off[i + 1] - off[i];
            if (np) fn(down[i], lo, hi, I, group, as + off[i], gas + off[i], (int)np, os + off[i], true);
        }
    }
    return 0;
}

// Read bandwidth probe: sum of a float32 buffer over `threads` threads (returned so it is not optimised away).
double specmoe_read_sum(const float* buf, int64_t n, int threads) {
    double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo = n * tid / nt / 64 * 64, hi = (tid == nt - 1) ? n : n * (tid + 1) / nt / 64 * 64;
        vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
        int64_t i = lo;
        for (; i + 4 * VL <= hi; i += 4 * VL) {
#if VL > 1
            for (int c = 0; c < 4 * VL * 4; c += 64) _mm_prefetch((const char*)(buf + i) + 2048 + c, _MM_HINT_T0);
#endif
            s0 = s0 + vload(buf + i);
            s1 = s1 + vload(buf + i + VL);
            s2 = s2 + vload(buf + i + 2 * VL);
            s3 = s3 + vload(buf + i + 3 * VL);
        }
        float s = vsum(s0 + s1 + s2 + s3);
        for (; i < hi; i++) s += buf[i];
        total += s;
    }
    return total;
}

}  // extern "C"
