"""llama.cpp's CPU kernels (ggml) as the peer of `host_kernels.py`: a small C driver, compiled against a ggml
build given by path, times one expert as llama.cpp computes it (ggml_mul_mat gate, up, silu, mul, ggml_mul_mat
down) in BF16, Q8_0, Q4_0, Q4_1 or MXFP4 on a persistent ggml threadpool; one process per expert and type
quantizes it once and times every (tokens, threads) case on it. No ggml code is kept here: the driver
includes the checkout's headers and links its build."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

GGML_TYPES = ("bf16", "q8_0", "q4_0", "q4_1", "mxfp4")

DRIVER_C = r"""
// Times one expert with ggml's CPU kernels: usage TYPE H I BUFFERS T:THREADS:REPEATS ...; the expert is quantized
// once, then each case (tokens, threads, repeats) is timed on it; prints one JSON line per case, in order.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ggml.h"
#include "ggml-cpu.h"
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static int cmp(const void* a, const void* b) { double x = *(const double*)a, y = *(const double*)b; return (x > y) - (x < y); }
int main(int argc, char** argv) {
    if (argc < 6) return 2;
    int H = atoi(argv[2]), I = atoi(argv[3]), nbuf = atoi(argv[4]);
    enum ggml_type type;
    if (!strcmp(argv[1], "bf16")) type = GGML_TYPE_BF16; else if (!strcmp(argv[1], "q8_0")) type = GGML_TYPE_Q8_0;
    else if (!strcmp(argv[1], "q4_0")) type = GGML_TYPE_Q4_0; else if (!strcmp(argv[1], "q4_1")) type = GGML_TYPE_Q4_1;
    else if (!strcmp(argv[1], "mxfp4")) type = GGML_TYPE_MXFP4;
    else return 2;
    if (nbuf > 64) nbuf = 64;
    ggml_cpu_init();
    size_t wbytes = ggml_row_size(type, H) * (size_t)(2 * I) + ggml_row_size(type, I) * (size_t)H;
    struct ggml_init_params ip = {nbuf * (wbytes + 65536) + (64u << 20), NULL, false};
    struct ggml_context* wctx = ggml_init(ip);  // the weights: quantized once, copied into every buffer
    float* src = malloc(sizeof(float) * (size_t)I * H);
    srand(1);
    for (size_t i = 0; i < (size_t)I * H; i++) src[i] = ((float)rand() / RAND_MAX - 0.5f) * 0.04f;
    struct ggml_tensor* w[64][3];
    for (int b = 0; b < nbuf; b++) {
        w[b][0] = ggml_new_tensor_2d(wctx, type, H, I);
        w[b][1] = ggml_new_tensor_2d(wctx, type, H, I);
        w[b][2] = ggml_new_tensor_2d(wctx, type, I, H);
        for (int m = 0; m < 3; m++) {
            if (b == 0) ggml_quantize_chunk(type, src, w[b][m]->data, 0, m < 2 ? I : H, m < 2 ? H : I, NULL);
            else memcpy(w[b][m]->data, w[0][m]->data, ggml_nbytes(w[0][m]));
        }
    }
    free(src);
    for (int c = 5; c < argc; c++) {
        int T, nth, reps;
        if (sscanf(argv[c], "%d:%d:%d", &T, &nth, &reps) != 3 || T < 1 || nth < 1 || reps < 1) return 2;
        struct ggml_init_params cp = {nbuf * ((size_t)T * (2 * H + 3 * I) * 4 * 2 + ggml_graph_overhead() + 65536) + (64u << 20),
                                      NULL, false};
        struct ggml_context* ctx = ggml_init(cp);  // this case's inputs and graphs
        struct ggml_cgraph* graphs[64];
        for (int b = 0; b < nbuf; b++) {
            struct ggml_tensor* x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, H, T);
            for (int i = 0; i < H * T; i++) ((float*)x->data)[i] = ((float)rand() / RAND_MAX - 0.5f);
            struct ggml_tensor* g = ggml_mul_mat(ctx, w[b][0], x);
            struct ggml_tensor* u = ggml_mul_mat(ctx, w[b][1], x);
            struct ggml_tensor* y = ggml_mul_mat(ctx, w[b][2], ggml_mul(ctx, ggml_silu(ctx, g), u));
            graphs[b] = ggml_new_graph(ctx);
            ggml_build_forward_expand(graphs[b], y);
        }
        struct ggml_threadpool_params tpp = ggml_threadpool_params_default(nth);
        struct ggml_threadpool* tp = ggml_threadpool_new(&tpp);
        struct ggml_cplan plans[64];
        size_t work = 0;
        for (int b = 0; b < nbuf; b++) { plans[b] = ggml_graph_plan(graphs[b], nth, tp); if (plans[b].work_size > work) work = plans[b].work_size; }
        uint8_t* wd = malloc(work + 64);
        for (int b = 0; b < nbuf; b++) { plans[b].work_data = wd; ggml_graph_compute(graphs[b], &plans[b]); }
        double* ts = malloc(sizeof(double) * reps);
        for (int r = 0; r < reps; r++) { double t0 = now(); ggml_graph_compute(graphs[r % nbuf], &plans[r % nbuf]); ts[r] = now() - t0; }
        qsort(ts, reps, sizeof(double), cmp);
        printf("{\"bytes\": %zu, \"tokens\": %d, \"threads\": %d, \"median_s\": %.9f, \"min_s\": %.9f, \"max_s\": %.9f}\n",
               wbytes, T, nth, ts[reps / 2], ts[0], ts[reps - 1]);
        fflush(stdout);
        free(ts);
        free(wd);
        ggml_threadpool_free(tp);
        ggml_free(ctx);
    }
    ggml_free(wctx);
    return 0;
}
"""


class Ggml:
    """llama.cpp's CPU kernels via a driver compiled against a ggml build."""

    def __init__(self, root: Path):
        self.root = root
        build = root / "build" / "src"
        if not (root / "include" / "ggml.h").exists() or not list(build.glob("libggml-cpu.so*")):
            raise SystemExit(f"--ggml {root}: expected a ggml checkout with include/ggml.h and its build in build/src "
                             "(cmake -B build -G Ninja -DGGML_NATIVE=ON && ninja -C build)")
        self.commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or "unknown"
        self.dir = Path(tempfile.mkdtemp(prefix="specmoe-ggml-"))
        (self.dir / "driver.c").write_text(DRIVER_C)
        self.exe = self.dir / "driver"
        subprocess.run(["gcc", "-O2", str(self.dir / "driver.c"), "-o", str(self.exe), f"-I{root / 'include'}",
                        f"-L{build}", "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{build}"], check=True)

    def time_cases(self, gtype: str, hidden: int, inter: int, buffers: int,
                   cases: list[tuple[int, int, int]]) -> list[dict]:
        """Each case (tokens, threads, repeats) timed in one process that quantizes the expert once: one dict
        (bytes, median_s, min_s, max_s) per case, in order."""
        out = subprocess.run([str(self.exe), gtype, str(hidden), str(inter), str(buffers),
                              *(f"{t}:{n}:{r}" for t, n, r in cases)], capture_output=True, text=True,
                             check=True).stdout
        rows = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
        if len(rows) != len(cases):
            raise RuntimeError(f"ggml driver gave {len(rows)} results for {len(cases)} cases")
        return rows

    def time(self, gtype: str, hidden: int, inter: int, tokens: int, threads: int, buffers: int,
             repeats: int) -> dict:
        return self.time_cases(gtype, hidden, inter, buffers, [(tokens, threads, repeats)])[0]


GGML_BLOCKS = {"bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "mxfp4": (32, 17)}  # (weights, bytes)


def ggml_bytes(gtype: str, hidden: int, inter: int) -> int:
    """Bytes of one expert in a ggml type (gate, up [I rows of H], down [H rows of I]), as ggml_row_size counts."""
    n, size = GGML_BLOCKS[gtype]
    return (2 * inter * -(-hidden // n) + hidden * -(-inter // n)) * size
