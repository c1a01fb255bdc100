// Row tiles of the formats specmoe writes itself (fp32 / bf16 / fp16, int8 per row, int4 group-wise):
// res[i][j] = dot(row r + i, token j), each row's weights decoded into registers once per column step.
// Included by experts.cpp only (after vec.h).

#pragma once

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

