// Tiles of the publishers' formats (vec.h: struct Mat), read in their own bytes:
//   MXFP4 and FP8 row tiles: res[i][j] = dot(row r + i, token j), as tiles.h's;
//   GPTQ column strips: qweight packs 8 codes of one output channel along K into an int32 and lays output
//   channels contiguously ([K/8, N]), so a strip is GSW adjacent output channels, walked down K.
// MXFP4 values are exact in float32 (e2m1 times a power of two): a 16-entry table per 32 values, scaled once.
// Included by experts.cpp only (after vec.h).

#pragma once

// ---- MXFP4 ----------------------------------------------------------------------------------------------
// x comes deinterleaved per 2 * VL columns (even columns, then odd; experts.cpp lut_pos) in the vector builds.
template <int NB>
static inline void tile_mxfp4(const Mat& m, int64_t r, int nr, int64_t K, const float* const* xs, float res[R][TB]) {
    const uint8_t* row[R];
    const uint8_t* sc[R];
    for (int i = 0; i < R; i++) {
        const int64_t rr = r + (i < nr ? i : 0);
        row[i] = m.w + rr * m.row_bytes;
        sc[i] = (const uint8_t*)m.scale + rr * m.groups;
    }
    const int64_t ahead = R * m.row_bytes;
    vf acc[R][NB];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = vzero();
#if defined(ISA_AVX512)
    const __m512 table = _mm512_loadu_ps(FP4_VALUES);
    const int64_t G = K / 32;
    __m512 sv[R];  // 16 groups' scales of each row at a time (e8m0_to_float, vectorised)
    for (int64_t k = 0, g = 0; k < K; k += 32, g++) {
        if (!(g & 15))
            for (int i = 0; i < R; i++) {
                __m128i raw;
                if (G - g >= 16) {
                    raw = _mm_loadu_si128((const __m128i*)(sc[i] + g));
                } else {  // the last groups, byte by byte (no call in the loop: the accumulators stay in registers)
                    alignas(16) uint8_t t[16] = {0};
                    for (int64_t b = 0; b < G - g; b++) t[b] = sc[i][g + b];
                    raw = _mm_load_si128((const __m128i*)t);
                }
                sv[i] = _mm512_castsi512_ps(_mm512_max_epi32(_mm512_slli_epi32(_mm512_cvtepu8_epi32(raw), 23),
                                                             _mm512_set1_epi32(0x00400000)));
            }
        const __m512i lane = _mm512_set1_epi32((int)(g & 15));
        __m512 xe[NB], xo[NB];
        for (int j = 0; j < NB; j++) { xe[j] = _mm512_loadu_ps(xs[j] + k); xo[j] = _mm512_loadu_ps(xs[j] + k + 16); }
        if (!(k & 127))
            for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + (k >> 1) + ahead), _MM_HINT_T0);
        for (int i = 0; i < R; i++) {
            const __m512 lut = _mm512_mul_ps(table, _mm512_permutexvar_ps(lane, sv[i]));
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row[i] + (k >> 1))));
            const __m512 we = _mm512_permutexvar_ps(b, lut);
            const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(wo, xo[j], _mm512_fmadd_ps(we, xe[j], acc[i][j]));
        }
    }
#elif defined(ISA_AVX2)
    // 8 lanes of magnitudes (vpermps reads the low 3 bits of a code c); xor with c << 28 puts c's bit 3, the
    // sign, at bit 31, and c's bits 0-2 at bits 28-30, which the table holds pre-flipped (entry i ^ i << 28)
    const __m256 mag = _mm256_loadu_ps(FP4_VALUES);
    const __m256i flip = _mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 28);
    const int64_t G = K / 32;
    __m256 sv[R];  // 8 groups' scales of each row at a time (e8m0_to_float, vectorised)
    for (int64_t k = 0, g = 0; k < K; k += 32, g++) {
        if (!(g & 7))
            for (int i = 0; i < R; i++) {
                uint64_t raw = 0;
                if (G - g >= 8) memcpy(&raw, sc[i] + g, 8);  // one 8-byte load
                else  // the last groups, byte by byte (no call in the loop: the accumulators stay in registers)
                    for (int64_t b = 0; b < G - g; b++) raw |= (uint64_t)sc[i][g + b] << (8 * b);
                sv[i] = _mm256_castsi256_ps(_mm256_max_epi32(
                    _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)raw)), 23), _mm256_set1_epi32(0x00400000)));
            }
        const __m256i lane = _mm256_set1_epi32((int)(g & 7));
        if (!(k & 127))
            for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + (k >> 1) + ahead), _MM_HINT_T0);
        __m256 lut[R];
        for (int i = 0; i < R; i++)
            lut[i] = _mm256_xor_ps(_mm256_mul_ps(mag, _mm256_permutevar8x32_ps(sv[i], lane)), _mm256_castsi256_ps(flip));
        for (int64_t h = k; h < k + 32; h += 16) {
            vf xe[NB], xo[NB];
            for (int j = 0; j < NB; j++) { xe[j] = vload(xs[j] + h); xo[j] = vload(xs[j] + h + 8); }
            for (int i = 0; i < R; i++) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row[i] + (h >> 1))));
                const __m256i vo = _mm256_srli_epi32(v, 4);
                const vf we = _mm256_xor_ps(_mm256_permutevar8x32_ps(lut[i], v),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
                const vf wo = _mm256_xor_ps(_mm256_permutevar8x32_ps(lut[i], vo),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(vo, 28)));
                for (int j = 0; j < NB; j++) acc[i][j] = vfma(wo, xo[j], vfma(we, xe[j], acc[i][j]));
            }
        }
    }
#else
    for (int64_t k = 0; k < K; k++) {
        for (int i = 0; i < R; i++) {
            const float w = FP4_VALUES[(row[i][k >> 1] >> ((k & 1) * 4)) & 15] * e8m0_to_float(sc[i][k >> 5]);
            for (int j = 0; j < NB; j++) acc[i][j] += w * xs[j][k];
        }
    }
#endif
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) res[i][j] = vsum(acc[i][j]);
}

// ---- FP8 e4m3, square blocks of B (the `group` argument) ------------------------------------------------
template <int NB>
static inline void tile_fp8(const Mat& m, int64_t r, int nr, int64_t K, int B, const float* const* xs,
                            float res[R][TB]) {
    const uint8_t* row[R];
    const float* sc[R];  // each row's block row of scale_inv
    for (int i = 0; i < R; i++) {
        const int64_t rr = r + (i < nr ? i : 0);
        row[i] = m.w + rr * m.row_bytes;
        sc[i] = (const float*)m.scale + (rr / B) * m.groups;
    }
    const int64_t ahead = R * m.row_bytes;
    vf acc[R][NB];
    float tail[R][NB];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) { acc[i][j] = vzero(); tail[i][j] = 0.f; }
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += B, b++) {
        const int64_t kend = k0 + B < K ? k0 + B : K, kv = k0 + (kend - k0) / VL * VL;
        vf sv[R];
        for (int i = 0; i < R; i++) sv[i] = vset1(sc[i][b] * 256.0f);  // 256: wload_fp8's 2^-8
        for (int64_t k = k0; k < kv; k += VL) {
#if VL > 1
            if (!(k & 63))
                for (int i = 0; i < R; i++) _mm_prefetch((const char*)(row[i] + k + ahead), _MM_HINT_T0);
#endif
            vf xv[NB];
            for (int j = 0; j < NB; j++) xv[j] = vload(xs[j] + k);
            for (int i = 0; i < R; i++) {
                const vf w = vmul(wload_fp8(row[i] + k), sv[i]);
                for (int j = 0; j < NB; j++) acc[i][j] = vfma(w, xv[j], acc[i][j]);
            }
        }
        for (int64_t k = kv; k < kend; k++)
            for (int i = 0; i < R; i++) {
                const float w = fp8_to_float(row[i][k]) * sc[i][b];
                for (int j = 0; j < NB; j++) tail[i][j] += w * xs[j][k];
            }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) res[i][j] = vsum(acc[i][j]) + tail[i][j];
}

// ---- GPTQ int4 ------------------------------------------------------------------------------------------
// Down K in runs of one group (g_idx constant): part = sum of code * x over the run, run = sum of x; at the end
// of a run acc += s * (part - (z + 1) * run). A sorted g_idx (desc_act false) changes run every G columns; an
// act-order g_idx as often as it changes group. x in column order.
#if defined(ISA_AVX512)
#define GCV 4  // vectors of output channels per share of the work (GCOLS)
#define GTB 2  // tokens per pass
typedef __m512i vi;
static inline vi viload(const int32_t* p) { return _mm512_loadu_si512((const void*)p); }
static inline vf vnib(vi q, int b) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q, 4 * b), _mm512_set1_epi32(15)));
}
static inline vf vmasked(vi q, int b) {  // code b times 2^4b (b < 7)
    return _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15 << (4 * b))));
}
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
#elif defined(ISA_AVX2)
#define GCV 2
#define GTB 2
typedef __m256i vi;
static inline vi viload(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vf vnib(vi q, int b) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 4 * b), _mm256_set1_epi32(15)));
}
static inline vf vmasked(vi q, int b) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15 << (4 * b))));
}
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
#else
#define GCV 1
#define GTB 1
#endif
#define GCOLS (GCV * VL)  // output channels per share of the work

// One output channel n, one token, scalar (the portable build; columns beyond the last whole vector)
static inline float gptq_dot1(const Mat& m, int64_t n, int64_t K, const float* x) {
    const int32_t* qw = (const int32_t*)m.w;
    const int32_t* qz = (const int32_t*)m.zero;
    const uint16_t* s = (const uint16_t*)m.scale;
    const int32_t* gi = (const int32_t*)m.aux;
    const int64_t N = m.groups, stride = m.row_bytes / 4;
    float acc = 0.f, part = 0.f, run = 0.f;
    int32_t cur = K > 0 ? gi[0] : 0;
    for (int64_t k = 0; k <= K; k++) {
        if (k == K || gi[k] != cur) {
            const float z1 = (float)(((qz[cur * (N / 8) + n / 8] >> (4 * (n % 8))) & 15) + 1);
            acc += half_to_float(s[cur * N + n]) * (part - z1 * run);
            if (k == K) break;
            part = run = 0.f;
            cur = gi[k];
        }
        part += (float)((qw[(k >> 3) * stride + n] >> (4 * (k & 7))) & 15) * x[k];
        run += x[k];
    }
    return acc;
}

#if VL > 1
#define GSW 256  // output channels per strip: 1 KiB of each packed row of qweight, read in one sweep down K
// Output channels [c, c + W) (W a multiple of VL, <= GSW) for NB tokens: ys[j][c ..] (+)= W[c .., :] . xs[j].
// Codes come out of a word by masks, not shifts: (q & 15 << 4b) is code * 2^4b exactly, times x * 2^-4b
// (exact) is code * x as rounded; the partial sums live in L1 (part, acc), a vector of the strip at a time.
template <int NB>
static inline void gptq_strip(const Mat& m, int64_t c, int64_t W, int64_t K, const float* const* xs,
                              float* const* ys, bool accumulate) {
    const int64_t N = m.groups, stride = m.row_bytes / 4, nv = W / VL;
    const int32_t* qw = (const int32_t*)m.w + c;
    const uint8_t* qz = (const uint8_t*)m.zero + c / 2;  // the zeros of column c: nibble c of the row's words
    const uint16_t* sc = (const uint16_t*)m.scale + c;
    const int32_t* gi = (const int32_t*)m.aux;
    alignas(64) float acc[NB][GSW], part[NB][GSW];
    float run[NB];
    for (int j = 0; j < NB; j++) {
        run[j] = 0.f;
        for (int64_t i = 0; i < W; i++) acc[j][i] = part[j][i] = 0.f;
    }
    int32_t cur = gi[0];
    auto flush = [&]() {  // acc += s * (part - (z + 1) * run) for the run of group `cur`
        for (int64_t v = 0; v < nv; v++) {
            const vf s = wload_fp16((const uint8_t*)(sc + cur * N + v * VL));
            const vf z1 = vfma(wload_int4(qz + cur * (N / 2) + v * VL / 2), vset1(1.0f), vset1(1.0f));
            for (int j = 0; j < NB; j++) {
                const vf p = vsub(vload(part[j] + v * VL), vmul(z1, vset1(run[j])));
                vstore(acc[j] + v * VL, vfma(s, p, vload(acc[j] + v * VL)));
                vstore(part[j] + v * VL, vzero());
            }
        }
        for (int j = 0; j < NB; j++) run[j] = 0.f;
    };
    for (int64_t k8 = 0; k8 < K / 8; k8++) {
        const int32_t* g8 = gi + 8 * k8;
        const int32_t* q8 = qw + k8 * stride;
        for (int64_t b = 0; b < W * 4; b += 64) _mm_prefetch((const char*)(q8 + 4 * stride) + b, _MM_HINT_T0);
        bool same = true;
        for (int b = 0; b < 8; b++) same &= g8[b] == cur;
        if (same) {
            float xk[NB][8];
            for (int j = 0; j < NB; j++)
                for (int b = 0; b < 8; b++) {
                    const float xv = xs[j][8 * k8 + b];
                    run[j] += xv;
                    xk[j][b] = b < 7 ? xv * (1.0f / (float)(1 << (4 * b))) : xv;
                }
            for (int64_t v = 0; v < nv; v++) {
                const vi q = viload(q8 + v * VL);
                vf w[8];
                for (int b = 0; b < 7; b++) w[b] = vmasked(q, b);
                w[7] = vnib(q, 7);
                for (int j = 0; j < NB; j++) {
                    vf p = vload(part[j] + v * VL);
                    for (int b = 0; b < 8; b++) p = vfma(w[b], vset1(xk[j][b]), p);
                    vstore(part[j] + v * VL, p);
                }
            }
            continue;
        }
        for (int b = 0; b < 8; b++) {  // a group boundary, or an act-order g_idx: column by column
            if (g8[b] != cur) { flush(); cur = g8[b]; }
            const int64_t k = 8 * k8 + b;
            for (int j = 0; j < NB; j++) run[j] += xs[j][k];
            for (int64_t v = 0; v < nv; v++) {
                const vf wb = vnib(viload(q8 + v * VL), b);
                for (int j = 0; j < NB; j++)
                    vstore(part[j] + v * VL, vfma(wb, vset1(xs[j][k]), vload(part[j] + v * VL)));
            }
        }
    }
    flush();
    for (int j = 0; j < NB; j++)
        for (int64_t i = 0; i < W; i++) ys[j][c + i] = accumulate ? ys[j][c + i] + acc[j][i] : acc[j][i];
}
#endif

// ys[j][n] (+)= W[n, :] . xs[j] for output channels n in [r0, r1) and nt tokens
static void gptq_rows(const Mat& m, int64_t r0, int64_t r1, int64_t K, int group, const float* const* xs,
                      const float* const* gsum, int nt, float* const* ys, bool accumulate) {
    (void)group; (void)gsum;
    int64_t c = r0;
#if VL > 1
    for (; c + VL <= r1; c += GSW) {
        const int64_t w = (r1 - c < GSW ? r1 - c : GSW) / VL * VL;
        for (int t0 = 0; t0 < nt; t0 += GTB) {
            if (nt - t0 >= 2) gptq_strip<2>(m, c, w, K, xs + t0, ys + t0, accumulate);
            else gptq_strip<1>(m, c, w, K, xs + t0, ys + t0, accumulate);
        }
        if (w < GSW) { c += w; break; }
    }
#endif
    for (; c < r1; c++)
        for (int j = 0; j < nt; j++) {
            const float d = gptq_dot1(m, c, K, xs[j]);
            ys[j][c] = accumulate ? ys[j][c] + d : d;
        }
}
