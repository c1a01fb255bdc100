// Routed experts of one MoE layer computed on the host, straight from the host store's bytes.
//
// out[t] += sum over routed pairs (t, e): w[t, e] * (down_e @ act(gate_e @ x[t] + b, up_e @ x[t] + b) + b_down)
//
// Weights are read in the store's own format (no dequantized copy): fp32, bf16, fp16 [N, K] row-major, int8
// [N, K] with a float32 scale per row (W = q * s), int4 [N, Kp/2] (two codes per byte, even column in the low
// nibble) with float16 scale and zero per (row, group of G columns) (W = code * s + z), as
// specmoe/kernels/quant.py writes them; and the publishers' MXFP4, block-scaled FP8 and GPTQ int4 as their
// checkpoints hold them (vec.h, specmoe/kernels/prequant.py). gate_up is [2I, H] (gate rows then up rows; gpt-oss:
// interleaved), down [H, I]; biases (gpt-oss) optional.
//
// Phases, one OpenMP team: (1) gate/up rows of every routed expert split over the threads by weight bytes,
// (2) activation, routing weight folded in, (3) down rows split over the threads (each thread owns output
// rows, so no atomics). Every weight byte is read once per call whatever the tokens: a tile of R rows (GPTQ: a
// strip of output channels) is decoded into registers once per column step and multiplied with TB tokens at a time.
//
// Compiled three times (ISA_AVX512, ISA_AVX2, neither = portable scalar); the loader picks one at run time.
// Opt-in (`q8`): MXFP4 weights times int8 activations, each token's x and each pair's activations quantized
// per 32 columns first (q8_tiles.h; changes the numerics).
// Files: vec.h (vector unit, loaders, Mat), tiles.h (specmoe's formats), prequant_tiles.h (publishers'),
// q8_tiles.h (MXFP4 x int8), this.

// Shape legend: T tokens, H hidden, I intermediate, n routed experts of this call, P routed pairs, K columns

#include "vec.h"
#include "tiles.h"
#include "prequant_tiles.h"
#include "q8_tiles.h"

template <int FMT, int NB>
static inline void row_tile(const Mat& m, int64_t r, int nr, int64_t K, int group, const float* const* xs,
                            const float* const* gsum, float res[R][TB]) {
    if constexpr (FMT == F_MXFP4) tile_mxfp4<NB>(m, r, nr, K, xs, res);
    else if constexpr (FMT == F_FP8) tile_fp8<NB>(m, r, nr, K, group, xs, res);
    else tile<FMT, NB>(m, r, nr, K, group, xs, gsum, res);
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
                case 1: row_tile<FMT, 1>(m, r, nr, K, group, x, gs, res); break;
#if TB >= 2
                case 2: row_tile<FMT, 2>(m, r, nr, K, group, x, gs, res); break;
#endif
#if TB >= 4
                case 3: row_tile<FMT, 3>(m, r, nr, K, group, x, gs, res); break;
                case 4: row_tile<FMT, 4>(m, r, nr, K, group, x, gs, res); break;
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
        case F_MXFP4: return rows_dot<F_MXFP4>;
        case F_FP8: return rows_dot<F_FP8>;
        case F_GPTQ: return gptq_rows;
    }
    return nullptr;
}

static inline float activate(float g, int act) {
    if (act == A_SILU) return g / (1.0f + expf(-g));
    if (act == A_GELU) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

// [lo, hi) of `total` items for thread `tid` of `nth`, in units of `unit` rows (R; GPTQ: GCOLS)
static inline void share(int64_t total, int tid, int nth, int64_t* lo, int64_t* hi, int64_t unit = R) {
    int64_t tiles = (total + unit - 1) / unit;
    *lo = tiles * tid / nth * unit;
    *hi = tiles * (tid + 1) / nth * unit;
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

// Whether int4 / MXFP4 read x deinterleaved per 2 * VL columns (even columns, then odd: `lut_pos`): the
// AVX-512 table path and the AVX2 path.
static inline bool int4_lut(int fmt, int group) {
#if defined(ISA_AVX512) || defined(ISA_AVX2)
    return (fmt == F_INT4 && group % (2 * VL) == 0) || fmt == F_MXFP4;
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
    return P * (2 * I + ip + 3 + Hx / group + ip / group + Hx) + P * (Hx + ip) / 8 + P * (Hx + ip) / 4;
}

// Returns 0 on success, a negative code on bad arguments.
//   fmt, act, group: weight format (F_*), activation (A_*), int4 / GPTQ group size (columns per scale), FP8
//     block, 32 for MXFP4 (any power of two >= 16 for the other formats)
//   x: [T, Hx] float32, zero from column H to Hx (Hx a multiple of the group and of 64)
//   ids: [T, k] int64 routed expert ids; wts: [T, k] float32 routing weights
//   chosen: [n] expert ids this call computes; gate_up / down: [n] matrices of those experts ([2I, H], [H, I])
//   out: [T, H] float32, accumulated into
//   scratch: specmoe_host_scratch(T * k, Hx, I, group) floats
//   act_params: A_SWIGLU_OAI's (alpha, limit); unused (may be null) for the others
//   q8: 1 = int8 activations (MXFP4 only: q8_tiles.h), 0 = exact float32 activations
int specmoe_host_experts(int fmt, int act, int group, int64_t T, int64_t H, int64_t I, int64_t Hx, const float* x,
                         int64_t k, const int64_t* ids, const float* wts, int64_t n, const int64_t* chosen,
                         const Mat* gate_up, const Mat* down, float* out, float* scratch, int threads,
                         const float* act_params, int q8) {
    rows_fn fn = pick(fmt);
    if (!fn || T < 0 || k < 1 || H <= 0 || I <= 0 || n < 0 || threads < 1) return -1;
    if (group < 16 || (group & (group - 1)) || Hx < H || Hx % group || Hx % 64) return -2;
    if (act < A_SILU || act > A_SWIGLU_OAI || (act == A_SWIGLU_OAI && !act_params)) return -3;
    if ((fmt == F_MXFP4 && (H % 32 || I % 32 || group != 32)) || (fmt == F_GPTQ && (H % 8 || I % 8))) return -4;
    if (q8 && fmt != F_MXFP4) return -5;
    const float alpha = act == A_SWIGLU_OAI ? act_params[0] : 0.f, limit = act == A_SWIGLU_OAI ? act_params[1] : 0.f;
    const int64_t unit = fmt == F_GPTQ ? GCOLS : R;  // rows per share of the work
    const int64_t P = T * k, ip = padded_inter(I, group), ngx = Hx / group, nga = ip / group;
    float* gu = scratch;                   // [P, 2I] gate/up before the activation, pairs grouped by expert
    float* a = gu + P * 2 * I;             // [P, ip] activations * routing weight, zero beyond I
    float* pw = a + P * ip;                // [P] routing weight of each grouped pair
    int64_t* ptok = (int64_t*)(pw + P);    // [P] token of each grouped pair
    float* gx = (float*)(ptok + P);        // [P, ngx] int4: sums of x over H's groups
    float* ga = gx + P * ngx;              // [P, nga] int4: sums of the activations over I's groups
    float* xd = ga + P * nga;              // [T, Hx] int4 table path: x deinterleaved
    float* dxq = xd + P * Hx;              // [T, Hx / 8] q8: x's scales (d / 2 per 32 columns, 4 times)
    float* daq = dxq + P * Hx / 8;         // [P, ip / 8] q8: the activations' scales
    int8_t* qx8 = (int8_t*)(daq + P * ip / 8);  // [T, Hx] q8: x as int8
    int8_t* qa8 = qx8 + P * Hx;            // [P, ip] q8: the activations as int8
    const bool lut = int4_lut(fmt, group) && !q8;
#if defined(ISA_AVX512)
    const bool need_gsum = fmt == F_INT4 && !lut;
#else
    const bool need_gsum = fmt == F_INT4;
#endif
    // group the routed pairs by chosen expert: expert i owns pairs [off[i], off[i + 1])
    int64_t off[n + 1];
    int64_t pe[P > 0 ? P : 1];  // chosen expert of each grouped pair
    int64_t p = 0;
    for (int64_t i = 0; i < n; i++) {
        off[i] = p;
        for (int64_t q = 0; q < P; q++)
            if (ids[q] == chosen[i]) { ptok[p] = q / k; pw[p] = wts[q]; pe[p] = i; p++; }
    }
    off[n] = p;
    if (p == 0) return 0;
    const float* xs[p];   // input row of each pair
    const float* as[p];   // activation row of each pair
    const float* gxs[p];  // group sums of each pair's input / activation
    const float* gas[p];
    float* gs[p];         // gate/up row of each pair
    float* os[p];         // output row of each pair's token
    const int8_t* qxs[p];  // q8: each pair's quantized input and activation rows, and their scales
    const int8_t* qas[p];
    const float* dxs[p];
    const float* das[p];
    for (int64_t q = 0; q < p; q++) {
        xs[q] = (lut ? xd : x) + ptok[q] * Hx; as[q] = a + q * ip; gs[q] = gu + q * 2 * I; os[q] = out + ptok[q] * H;
        gxs[q] = gx + q * ngx; gas[q] = ga + q * nga;
        qxs[q] = qx8 + ptok[q] * Hx; dxs[q] = dxq + ptok[q] * (Hx / 8); qas[q] = qa8 + q * ip; das[q] = daq + q * (ip / 8);
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
        if (q8)
            for (int64_t t = T * tid / nt; t < T * (tid + 1) / nt; t++)
                quantize_q8(x + t * Hx, H, qx8 + t * Hx, dxq + t * (Hx / 8));
        if (lut || need_gsum || q8) {
#pragma omp barrier
        }
        // (1) gate/up
        share(rows1, tid, nt, &lo, &hi, unit);
        int64_t base = 0;
        for (int64_t i = 0; i < n && lo < hi; i++) {
            const int64_t np = off[i + 1] - off[i];
            if (!np) continue;
            const int64_t s = lo > base ? lo - base : 0, e = hi - base < 2 * I ? hi - base : 2 * I;
            if (s < e && q8) rows_dot_q8(gate_up[i], s, e, H, qxs + off[i], dxs + off[i], (int)np, gs + off[i], false);
            else if (s < e) fn(gate_up[i], s, e, H, group, xs + off[i], gxs + off[i], (int)np, gs + off[i], false);
            base += 2 * I;
        }
#pragma omp barrier
        // (2) activation * up * routing weight, zero padding, group sums
        for (int64_t q = plo; q < phi; q++) {
            const float* g = gu + q * 2 * I;
            float* aq = a + q * ip;
            const Mat& gm = gate_up[pe[q]];
            if (act == A_SWIGLU_OAI) {  // gate 2j, up 2j + 1, each with its bias
                for (int64_t j = 0; j < I; j++) {
                    float gg = g[2 * j] + bias_at(gm, 2 * j), uu = g[2 * j + 1] + bias_at(gm, 2 * j + 1);
                    gg = fminf(gg, limit);
                    uu = fminf(fmaxf(uu, -limit), limit);
                    aq[lut ? lut_pos(j) : j] = (uu + 1.0f) * (gg / (1.0f + expf(-alpha * gg))) * pw[q];
                }
                for (int64_t j = I; j < ip; j++) aq[lut ? lut_pos(j) : j] = 0.f;
            } else if (gm.bias_fmt != B_NONE) {
                for (int64_t j = 0; j < I; j++)
                    aq[lut ? lut_pos(j) : j] = activate(g[j] + bias_at(gm, j), act) * (g[I + j] + bias_at(gm, I + j)) * pw[q];
                for (int64_t j = I; j < ip; j++) aq[lut ? lut_pos(j) : j] = 0.f;
            } else if (lut) {
                for (int64_t j = 0; j < I; j++) aq[lut_pos(j)] = activate(g[j], act) * g[I + j] * pw[q];
                for (int64_t j = I; j < ip; j++) aq[lut_pos(j)] = 0.f;
            } else {
                for (int64_t j = 0; j < I; j++) aq[j] = activate(g[j], act) * g[I + j] * pw[q];
                for (int64_t j = I; j < ip; j++) aq[j] = 0.f;
            }
            if (q8) quantize_q8(aq, I, qa8 + q * ip, daq + q * (ip / 8));
            if (need_gsum)
                for (int64_t g2 = 0; g2 < nga; g2++) {
                    float s = 0.f;
                    for (int64_t c = g2 * group; c < (g2 + 1) * group; c++) s += aq[c];
                    ga[q * nga + g2] = s;
                }
        }
#pragma omp barrier
        // (3) down: this thread's output rows, every expert (one expert's pairs are distinct tokens)
        share(H, tid, nt, &lo, &hi, unit);
        for (int64_t i = 0; i < n && lo < hi; i++) {
            const int64_t np = off[i + 1] - off[i];
            if (np && q8) rows_dot_q8(down[i], lo, hi, I, qas + off[i], das + off[i], (int)np, os + off[i], true);
            else if (np) fn(down[i], lo, hi, I, group, as + off[i], gas + off[i], (int)np, os + off[i], true);
            if (np && down[i].bias_fmt != B_NONE)  // its bias, times each pair's routing weight
                for (int64_t q = off[i]; q < off[i + 1]; q++)
                    for (int64_t r = lo; r < hi; r++) os[q][r] += pw[q] * bias_at(down[i], r);
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
