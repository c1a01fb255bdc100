// MXFP4 weights times int8 activations: the opt-in path (`host_activations="int8"`), as llama.cpp's MXFP4 x
// Q8_0 dot product. It changes the numerics: each row of activations (a token's x, a pair's SwiGLU output) is
// rounded to int8 with one scale per 32 columns, d = max|v| / 127, q = round(v / d), so every activation is off
// by at most d / 2; the weights stay exact (2 * e2m1 is an integer in [-12, 12]), the dot of a block is an exact
// int32, and the e8m0 scale times d is applied in float32 per block.
// AVX2: vpshufb decodes 32 nibbles to int8, vpmaddubsw / vpmaddwd multiply-add (|w| unsigned times x with w's
// sign); AVX-512 (BW): the same on two blocks at a time, the sign applied by a mask; portable: the same sums.
// Included by experts.cpp only (after vec.h).

#pragma once

// twice the e2m1 values: w = FP4_TWICE[code] * 2^(s - 127) / 2 (the / 2 goes into the activation's scale)
alignas(16) static const int8_t FP4_TWICE[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Position of column c of a block of 32 in its quantized row: the order a block's 16 bytes of nibbles unpack
// in (low nibbles: even columns, then high nibbles: odd columns).
static inline int q8_pos(int c) { return (c & 1) ? 16 + (c >> 1) : (c >> 1); }

// v [K] (K a multiple of 32) -> q [K] int8 (q8_pos order per block) and ds [K / 32]: d / 2 per block.
static inline void quantize_q8(const float* v, int64_t K, int8_t* q, float* ds) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float* vb = v + 32 * b;
        float amax = 0.f;
        for (int c = 0; c < 32; c++) amax = fmaxf(amax, fabsf(vb[c]));
        const float d = amax / 127.0f;
        int8_t* qb = q + 32 * b;
        for (int c = 0; c < 32; c++) {
            const float t = d > 0.f ? rintf(vb[c] / d) : 0.f;
            qb[q8_pos(c)] = (int8_t)fmaxf(-127.f, fminf(127.f, t));
        }
        ds[b] = 0.5f * d;
    }
}

#if defined(ISA_AVX512) || defined(ISA_AVX2)
// 16 bytes of codes (one block of one row) -> 32 int8 weights, low nibbles then high nibbles
static inline __m256i q8_weights(const uint8_t* p, __m256i table) {
    const __m128i b = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0f);
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, m)),
                                              _mm_and_si128(_mm_srli_epi16(b, 4), m), 1);
    return _mm256_shuffle_epi8(table, v);
}
// 8 int32 sums of 4 products w * x each (|w| <= 12, |x| <= 127: no int16 pair saturates)
static inline __m256i q8_dot(__m256i w, __m256i aw, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
#endif

// One tile: rows [r, r + nr) (nr <= R) of an MXFP4 matrix times NB quantized tokens (qx[j] [K], dx[j] [K / 32]).
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
#if defined(ISA_AVX512)
    // two blocks a step: 32 bytes of codes, each block's 16 twice in a 128-bit lane, the second shifted by 4
    const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i*)FP4_TWICE));
    const __m512i dup = _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), nib = _mm512_set1_epi8(0x0f);
    const long long four = 0x0004000400040004LL;
    const __m512i shift = _mm512_setr_epi64(0, 0, four, four, 0, 0, four, four), ones = _mm512_set1_epi16(1);
    __m512 acc[R][NB];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (; g + 2 <= G; g += 2) {
        if (!(g & 3))
            for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + 16 * g + ahead), _MM_HINT_T0);
        __m512i xq[NB];
        __m512 xd[NB];
        for (int j = 0; j < NB; j++) {
            xq[j] = _mm512_loadu_si512((const void*)(qx[j] + 32 * g));
            xd[j] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(dx[j][g]), _mm512_set1_ps(dx[j][g + 1]));
        }
        for (int i = 0; i < R; i++) {
            const __m512i b = _mm512_permutexvar_epi64(dup, _mm512_castsi256_si512(
                _mm256_loadu_si256((const __m256i*)(row[i] + 16 * g))));
            const __m512i w = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srlv_epi16(b, shift), nib));
            const __m512i aw = _mm512_abs_epi8(w);
            const __mmask64 neg = _mm512_movepi8_mask(w);
            const __m512 ws = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(e8m0_to_float(sc[i][g])),
                                                   _mm512_set1_ps(e8m0_to_float(sc[i][g + 1])));
            for (int j = 0; j < NB; j++) {
                const __m512i sx = _mm512_mask_sub_epi8(xq[j], neg, _mm512_setzero_si512(), xq[j]);
                const __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), ones);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(ws, xd[j]), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) tail[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#endif
#if defined(ISA_AVX512) || defined(ISA_AVX2)
    // one block a step (AVX-512: the last block of an odd count)
    if (g < G) {
        const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)FP4_TWICE));
        __m256 acc8[R][NB];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) acc8[i][j] = _mm256_setzero_ps();
        for (; g < G; g++) {
            if (!(g & 3))
                for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + 16 * g + ahead), _MM_HINT_T0);
            __m256i xq[NB];
            for (int j = 0; j < NB; j++) xq[j] = _mm256_loadu_si256((const __m256i*)(qx[j] + 32 * g));
            for (int i = 0; i < R; i++) {
                const __m256i w = q8_weights(row[i] + 16 * g, table);
                const __m256i aw = _mm256_sign_epi8(w, w);
                const float ws = e8m0_to_float(sc[i][g]);
                for (int j = 0; j < NB; j++)
                    acc8[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_dot(w, aw, xq[j])),
                                                 _mm256_set1_ps(ws * dx[j][g]), acc8[i][j]);
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NB; j++) {
                __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc8[i][j]), _mm256_extractf128_ps(acc8[i][j], 1));
                s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                tail[i][j] += _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
            }
    }
#else
    for (; g < G; g++)
        for (int i = 0; i < R; i++) {
            const float ws = e8m0_to_float(sc[i][g]);
            for (int j = 0; j < NB; j++) {
                int32_t s = 0;
                for (int c = 0; c < 32; c++)
                    s += FP4_TWICE[(row[i][16 * g + (c >> 1)] >> ((c & 1) * 4)) & 15] * qx[j][32 * g + q8_pos(c)];
                tail[i][j] += (float)s * (ws * dx[j][g]);
            }
        }
#endif
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
