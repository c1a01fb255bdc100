// MXFP4 weights times int8 activations: the opt-in path (`host_activations="int8"`), as llama.cpp's MXFP4 x
// Q8_0 dot product. It changes the numerics: each row of activations (a token's x, a pair's SwiGLU output) is
// rounded to int8 with one scale per 32 columns, d = max|v| / 127, q = round(v / d), so every activation is off
// by at most d / 2; the weights stay exact (2 * e2m1 is an integer in [-12, 12]), the dot of a block is an exact
// int32, and the e8m0 scale times d is applied in float32 per block.
// AVX2 (and the AVX-512 build, at 256 bits): two blocks a step, vpshufb decodes 64 nibbles to int8, vpmaddubsw /
// vpmaddwd multiply-add (|w| unsigned times x with w's sign), one float32 fma per 4 products' sum; portable (and
// a last unpaired block): the same integer sums, scalar.
// Included by experts.cpp only (after vec.h).

#pragma once

// twice the e2m1 values: w = FP4_TWICE[code] * 2^(s - 127) / 2 (the / 2 goes into the activation's scale)
alignas(16) static const int8_t FP4_TWICE[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Where column c of block b (of G) of a row goes in its quantized row: blocks in pairs, each pair's 64 values
// as (even columns of b, of b + 1, odd columns of b, of b + 1), the order 32 bytes of nibbles unpack in (low
// nibbles, then high); a last unpaired block as (even columns, odd columns).
static inline int64_t q8_index(int64_t b, int c, int64_t G) {
    if ((b | 1) < G) return 64 * (b >> 1) + ((c & 1) << 5) + ((b & 1) << 4) + (c >> 1);
    return 32 * b + ((c & 1) << 4) + (c >> 1);
}

// v [K] (K a multiple of 32) -> q [K] int8 (q8_index order) and ds [4 * K / 32]: d / 2 of each block, 4 times
// (a pair of blocks' steps as one vector of 8 lanes).
static inline void quantize_q8(const float* v, int64_t K, int8_t* q, float* ds) {
    const int64_t G = K / 32;
    for (int64_t b = 0; b < G; b++) {
        const float* vb = v + 32 * b;
        float amax = 0.f;
        for (int c = 0; c < 32; c++) amax = fmaxf(amax, fabsf(vb[c]));
        const float d = amax / 127.0f;
        for (int c = 0; c < 32; c++) {
            const float t = d > 0.f ? rintf(vb[c] / d) : 0.f;
            q[q8_index(b, c, G)] = (int8_t)fmaxf(-127.f, fminf(127.f, t));
        }
        for (int r = 0; r < 4; r++) ds[4 * b + r] = 0.5f * d;
    }
}

#if defined(ISA_AVX512) || defined(ISA_AVX2)
// 8 int32 sums of 4 products w * x each, from int16 pair sums (|w| <= 12, |x| <= 127: 2 pairs fit in int16)
static inline __m256i q8_dot(__m256i wl, __m256i wh, __m256i xl, __m256i xh) {
    const __m256i lo = _mm256_maddubs_epi16(_mm256_sign_epi8(wl, wl), _mm256_sign_epi8(xl, wl));
    const __m256i hi = _mm256_maddubs_epi16(_mm256_sign_epi8(wh, wh), _mm256_sign_epi8(xh, wh));
    return _mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1));
}
// 8 e8m0 scales from 8 bytes (e8m0_to_float, vectorised)
static inline __m256 q8_scales8(const uint8_t* p, int64_t n) {
    uint64_t raw = 0;
    if (n >= 8) memcpy(&raw, p, 8);
    else for (int64_t b = 0; b < n; b++) raw |= (uint64_t)p[b] << (8 * b);
    return _mm256_castsi256_ps(_mm256_max_epi32(_mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)raw)), 23),
                                                _mm256_set1_epi32(0x00400000)));
}
#endif

// One tile: rows [r, r + nr) (nr <= R) of an MXFP4 matrix times NB quantized tokens (qx[j] [K], dx[j] [K / 8]).
template <int NB>
static inline void tile_mxfp4_q8(const Mat& m, int64_t r, int nr, int64_t K, const int8_t* const* qx,
                                 const float* const* dx, float res[R][TB]) {
    const uint8_t* row[R];
    const uint8_t* sc[R];
    for (int i = 0; i < R; i++) {
        const int64_t rr = r + (i < nr ? i : 0);
        row[i] = m.w + rr * m.row_bytes;
        sc[i] = (const uint8_t*)m.scale + rr * m.groups;
    }
    const int64_t G = K / 32, ahead = R * m.row_bytes;
    float tail[R][NB];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) tail[i][j] = 0.f;
    int64_t g = 0;
#if defined(ISA_AVX512) || defined(ISA_AVX2)
    // a pair of blocks a step: 32 bytes of codes, low nibbles (even columns of both) and high nibbles (odd
    // columns); int32 lanes 0-3 hold block g's sums, 4-7 block g + 1's
    const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)FP4_TWICE));
    const __m256i nib = _mm256_set1_epi8(0x0f), pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[R][NB], sv[R];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
    for (; g + 2 <= G; g += 2) {
        if (!(g & 7))  // 8 blocks' scales of each row at a time
            for (int i = 0; i < R; i++) sv[i] = q8_scales8(sc[i] + g, G - g);
        if (!(g & 3))
            for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + 16 * g + ahead), _MM_HINT_T0);
        const __m256i lane = _mm256_add_epi32(pair, _mm256_set1_epi32((int)(g & 7)));
        __m256i xl[NB], xh[NB];
        __m256 xd[NB];
        for (int j = 0; j < NB; j++) {
            xl[j] = _mm256_loadu_si256((const __m256i*)(qx[j] + 32 * g));
            xh[j] = _mm256_loadu_si256((const __m256i*)(qx[j] + 32 * g + 32));
            xd[j] = _mm256_loadu_ps(dx[j] + 4 * g);
        }
        for (int i = 0; i < R; i++) {
            const __m256i b = _mm256_loadu_si256((const __m256i*)(row[i] + 16 * g));
            const __m256i wl = _mm256_shuffle_epi8(table, _mm256_and_si256(b, nib));
            const __m256i wh = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b, 4), nib));
            const __m256 ws = _mm256_permutevar8x32_ps(sv[i], lane);
            for (int j = 0; j < NB; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_dot(wl, wh, xl[j], xh[j])),
                                            _mm256_mul_ps(ws, xd[j]), acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) {
            __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
            t = _mm_add_ps(t, _mm_movehl_ps(t, t));
            tail[i][j] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
        }
#endif
    for (; g < G; g++)  // a last unpaired block (every block in the portable build)
        for (int i = 0; i < R; i++) {
            const float ws = e8m0_to_float(sc[i][g]);
            for (int j = 0; j < NB; j++) {
                int32_t s = 0;
                for (int c = 0; c < 32; c++)
                    s += FP4_TWICE[(row[i][16 * g + (c >> 1)] >> ((c & 1) * 4)) & 15] * qx[j][q8_index(g, c, G)];
                tail[i][j] += (float)s * (ws * dx[j][4 * g]);
            }
        }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) res[i][j] = tail[i][j];
}

// ys[j][r] (+)= dot(M[r], token j) for rows r in [r0, r1) and nt quantized tokens.
static void rows_dot_q8(const Mat& m, int64_t r0, int64_t r1, int64_t K, const int8_t* const* qx,
                        const float* const* dx, int nt, float* const* ys, bool accumulate) {
    for (int64_t r = r0; r < r1; r += R) {
        const int nr = (int)((r1 - r) < R ? (r1 - r) : R);
        for (int t0 = 0; t0 < nt; t0 += TB) {
            const int nb = (nt - t0) < TB ? (nt - t0) : TB;
            float res[R][TB];
            switch (nb) {
                case 1: tile_mxfp4_q8<1>(m, r, nr, K, qx + t0, dx + t0, res); break;
#if TB >= 2
                case 2: tile_mxfp4_q8<2>(m, r, nr, K, qx + t0, dx + t0, res); break;
#endif
#if TB >= 4
                case 3: tile_mxfp4_q8<3>(m, r, nr, K, qx + t0, dx + t0, res); break;
                case 4: tile_mxfp4_q8<4>(m, r, nr, K, qx + t0, dx + t0, res); break;
#endif
            }
            for (int j = 0; j < nb; j++) {
                float* yr = ys[t0 + j] + r;
                for (int i = 0; i < nr; i++) yr[i] = accumulate ? yr[i] + res[i][j] : res[i][j];
            }
        }
    }
}
