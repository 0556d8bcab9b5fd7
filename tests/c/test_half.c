/* bfloat16 and float16 on the host: the conversions to and from float32 (every 16-bit pattern; float32 patterns
 * across the whole range, ties, subnormals, overflow, NaN; the vector kernels against plain C at every tail
 * length), and the linear ops (Y = X W^T + b, dX = dY W, dW = dY^T X, db, accumulating and assigning) against a
 * double reference within the bound of float32 accumulation and one rounding:
 *     |got - ref| <= (K + 1) * 2^-24 * 1.01 * sum |terms| + u * |ref| + eta
 * (K terms and the bias or the old gradient; u = 2^-8 bfloat16, 2^-11 float16: the output's rounding; eta: half
 * the output's smallest subnormal). The same ops with TPLINEAR_HALF_SIMD=0 (a child forked before any knob is
 * read) give the same bits. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#include "../../csrc/core/dtype.h" /* white box: the conversions with the kernel chosen */

static float bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static double widen(tp_dtype dt, uint16_t h)
{
    float f;
    tp_half_to_float32_with(0, dt, &h, &f, 1);
    return f;
}

/* Every 16-bit pattern widens the same on both paths; bfloat16 is the top half of the float32; float16's value
 * is sign * 2^(e - 15) * 1.m, or 2^-24 * m for subnormals; a non-NaN pattern rounds back to itself. */
static void test_widen_all(tp_dtype dt)
{
    static uint16_t h[65536], back[65536];
    static float a[65536], b[65536];
    for (uint32_t i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    tp_half_to_float32_with(0, dt, h, a, 65536);
    tp_half_to_float32_with(1, dt, h, b, 65536);
    EXPECT(memcmp(a, b, sizeof a) == 0);
    for (uint32_t i = 0; i < 65536; i++) {
        double want;
        if (dt == TP_BFLOAT16) {
            EXPECT(f_bits(a[i]) == i << 16);
            continue;
        }
        {
            int e = (int)((i >> 10) & 0x1F), m = (int)(i & 0x3FF);
            want = e == 31 ? (m ? NAN : INFINITY) : e ? ldexp(1.0 + m / 1024.0, e - 15) : ldexp(m, -24);
            if (i & 0x8000) want = -want;
        }
        if (isnan(want))
            EXPECT(isnan(a[i]) && (f_bits(a[i]) & 0x400000u) && ((f_bits(a[i]) >> 13) & 0x3FFu) == ((i & 0x3FFu) | 0x200u));
        else
            EXPECT((double)a[i] == want);
    }
    tp_half_from_float32_with(0, dt, a, back, 65536);
    for (uint32_t i = 0; i < 65536; i++)
        if (!isnan(a[i])) EXPECT(back[i] == h[i]);
}

/* x rounds to h: the nearest of h's neighbours, ties to an even pattern; beyond the largest finite value
 * (plus half an ulp) to infinity; NaN to NaN. */
static int rounds_right(tp_dtype dt, float x, uint16_t h)
{
    double v = x, got = widen(dt, h);
    uint16_t mag = h & 0x7FFF;
    if (isnan(x)) return isnan(got);
    if (isinf(got)) { /* overflow: |x| at least the largest finite + half its ulp */
        double maxf = dt == TP_BFLOAT16 ? ldexp(255.0 / 128, 127) : 65504.0;
        double ulp = dt == TP_BFLOAT16 ? ldexp(1, 120) : 32;
        return (got > 0) == (v > 0) && fabs(v) >= maxf + ulp / 2;
    }
    if (signbit(got) != signbit(v) && got != 0) return 0;
    {
        double lo = mag > 0 ? fabs(widen(dt, (uint16_t)(mag - 1))) : 0, hi = fabs(widen(dt, (uint16_t)(mag + 1)));
        double g = fabs(got), a = fabs(v);
        if (isinf(hi)) hi = 2 * g - lo;
        if (fabs(a - g) > fabs(a - lo) || fabs(a - g) > fabs(a - hi)) return 0;
        if ((fabs(a - g) == fabs(a - lo) && mag > 0) || fabs(a - g) == fabs(a - hi)) return (mag & 1) == 0; /* tie */
        return 1;
    }
}

static void test_narrow(tp_dtype dt)
{
    enum { N = 1 << 16 };
    static float x[N];
    static uint16_t p[N], s[N];
    unsigned seed = 7;
    int bad = 0;
    /* patterns across the whole float32 range, then ties and neighbours around every 16-bit value */
    for (uint64_t base = 0; base < (1ull << 32); base += (uint64_t)N * 4099u) {
        for (int i = 0; i < N; i++) x[i] = bits_f((uint32_t)(base + (uint64_t)i * 4099u));
        tp_half_from_float32_with(0, dt, x, p, N);
        tp_half_from_float32_with(1, dt, x, s, N);
        EXPECT(memcmp(p, s, sizeof p) == 0);
        for (int i = 0; i < N; i++) bad += !rounds_right(dt, x[i], p[i]);
    }
    for (int i = 0; i < N; i++) {
        double a = widen(dt, (uint16_t)i), b = widen(dt, (uint16_t)(i + 1));
        seed = seed * 1103515245u + 12345u;
        x[i] = (i & 0x7C00) == 0x7C00 && dt == TP_FLOAT16 ? bits_f(seed) : (float)((a + b) / 2); /* the tie */
        if (seed & 0x10000) x[i] = bits_f(f_bits(x[i]) + ((seed >> 17) & 1 ? 1u : -1u)); /* or beside it */
    }
    tp_half_from_float32_with(0, dt, x, p, N);
    tp_half_from_float32_with(1, dt, x, s, N);
    EXPECT(memcmp(p, s, sizeof p) == 0);
    for (int i = 0; i < N; i++) bad += !rounds_right(dt, x[i], p[i]);
    if (bad) fprintf(stderr, "%s: %d values rounded wrong\n", tp_dtype_name(dt), bad);
    EXPECT(bad == 0);
    /* every length 0..40 and an unaligned start: the vector bodies and their plain tails agree */
    for (size_t n = 0; n <= 40; n++) {
        float w0[41], w1[41];
        uint16_t a[41], b[41];
        memset(a, 0, sizeof a);
        memset(b, 0, sizeof b);
        tp_half_from_float32_with(0, dt, x + 3, a, n);
        tp_half_from_float32_with(1, dt, x + 3, b, n);
        EXPECT(memcmp(a, b, sizeof a) == 0);
        memset(w0, 0, sizeof w0);
        memset(w1, 0, sizeof w1);
        tp_half_to_float32_with(0, dt, p + 1, w0, n);
        tp_half_to_float32_with(1, dt, p + 1, w1, n);
        EXPECT(memcmp(w0, w1, sizeof w0) == 0);
    }
}

/* ---------------------------------------------------------------- the linear ops */

static const int64_t SHAPES[][3] = {{1, 1, 1}, {5, 7, 3}, {3, 9, 0}, {4, 0, 5}, {0, 8, 4}, {33, 64, 17},
                                    {8, 1037, 259}, {70, 300, 600}};
#define NSHAPES (sizeof SHAPES / sizeof SHAPES[0])

static double rnd(unsigned *s)
{
    *s = *s * 1103515245u + 12345u;
    return ((double)((*s >> 8) & 0xffff) / 65536.0) - 0.5;
}

/* n values of dt (scaled by scale) in h and their exact values in v */
static void fill(tp_dtype dt, unsigned *seed, int64_t n, double scale, uint16_t *h, double *v)
{
    for (int64_t i = 0; i < n; i++) {
        float f = (float)(rnd(seed) * scale);
        tp_half_from_float32_with(0, dt, &f, &h[i], 1);
        v[i] = widen(dt, h[i]);
    }
}

/* |got - ref| within the bound; mag: sum of |terms| of the element */
static int within(tp_dtype dt, double got, double ref, double mag, int64_t k)
{
    double u = dt == TP_BFLOAT16 ? ldexp(1, -8) : ldexp(1, -11), eta = dt == TP_BFLOAT16 ? ldexp(1, -134) : ldexp(1, -25);
    double bound = (double)(k + 1) * ldexp(1, -24) * 1.01 * mag + u * fabs(ref) + eta;
    return fabs(got - ref) <= bound;
}

/* Runs the ops of one case, checks them against the reference, and appends every output's bytes to out
 * (the bits the other kernel path must reproduce); returns the bytes written. */
static size_t run_case(tp_dtype dt, const int64_t *shape, int with_bias, int fortran_x, char *out)
{
    int64_t m = shape[0], in = shape[1], o = shape[2];
    unsigned seed = (unsigned)(m * 131 + in * 7 + o + (int)dt * 5 + with_bias);
    size_t n_x = (size_t)(m * in), n_w = (size_t)(o * in), n_y = (size_t)(m * o), written = 0;
    uint16_t *hx = calloc(n_x + 1, 2), *hxs = calloc(n_x + 1, 2), *hw = calloc(n_w + 1, 2), *hb = calloc((size_t)o + 1, 2);
    uint16_t *hdy = calloc(n_y + 1, 2), *hy = calloc(n_y + 1, 2), *hdx = calloc(n_x + 1, 2);
    uint16_t *hdw = calloc(n_w + 1, 2), *hdb = calloc((size_t)o + 1, 2);
    double *x = calloc(n_x + 1, 8), *w = calloc(n_w + 1, 8), *b = calloc((size_t)o + 1, 8), *dy = calloc(n_y + 1, 8);
    tp_tensor X, W, B, DY, Y, DX, DW, DB;
    int bad = 0;
    fill(dt, &seed, (int64_t)n_x, 4, hx, x);
    fill(dt, &seed, (int64_t)n_w, 1, hw, w);
    fill(dt, &seed, o, 2, hb, b);
    fill(dt, &seed, (int64_t)n_y, 1, hdy, dy);
    for (int64_t i = 0; i < m; i++) /* X stored column-major when fortran_x */
        for (int64_t k = 0; k < in; k++) hxs[fortran_x ? k * m + i : i * in + k] = hx[i * in + k];
    EXPECT_OK(tp_tensor_init(&X, hxs, dt, 2, (int64_t[]){m, in}));
    if (fortran_x) {
        X.strides[0] = 1;
        X.strides[1] = m > 1 ? m : 1;
    }
    EXPECT_OK(tp_tensor_init(&W, hw, dt, 2, (int64_t[]){o, in}));
    EXPECT_OK(tp_tensor_init(&B, hb, dt, 1, (int64_t[]){o}));
    EXPECT_OK(tp_tensor_init(&DY, hdy, dt, 2, (int64_t[]){m, o}));
    EXPECT_OK(tp_tensor_init(&Y, hy, dt, 2, (int64_t[]){m, o}));
    EXPECT_OK(tp_tensor_init(&DX, hdx, dt, 2, (int64_t[]){m, in}));
    EXPECT_OK(tp_tensor_init(&DW, hdw, dt, 2, (int64_t[]){o, in}));
    EXPECT_OK(tp_tensor_init(&DB, hdb, dt, 1, (int64_t[]){o}));
    EXPECT_OK(tp_linear_forward(&X, &W, with_bias ? &B : NULL, &Y));
    EXPECT_OK(tp_linear_backward_input(&DY, &W, &DX));
    EXPECT_OK(tp_linear_backward_params_mode(&DY, &X, &DW, &DB, TP_GRAD_ASSIGN));
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < o; j++) {
            double ref = with_bias ? b[j] : 0, mag = with_bias ? fabs(b[j]) : 0;
            for (int64_t k = 0; k < in; k++) ref += x[i * in + k] * w[j * in + k], mag += fabs(x[i * in + k] * w[j * in + k]);
            bad += !within(dt, widen(dt, hy[i * o + j]), ref, mag, in);
        }
    for (int64_t i = 0; i < m; i++)
        for (int64_t k = 0; k < in; k++) {
            double ref = 0, mag = 0;
            for (int64_t j = 0; j < o; j++) ref += dy[i * o + j] * w[j * in + k], mag += fabs(dy[i * o + j] * w[j * in + k]);
            bad += !within(dt, widen(dt, hdx[i * in + k]), ref, mag, o);
        }
    memcpy(out + written, hy, n_y * 2), written += n_y * 2;
    memcpy(out + written, hdx, n_x * 2), written += n_x * 2;
    /* dW and db assigned, then accumulated onto (the old value joins the float32 sum) */
    for (int pass = 0; pass < 2; pass++) {
        uint16_t *old = malloc((n_w + (size_t)o + 1) * 2);
        memcpy(old, hdw, n_w * 2);
        memcpy(old + n_w, hdb, (size_t)o * 2);
        if (pass) EXPECT_OK(tp_linear_backward_params_mode(&DY, &X, &DW, &DB, TP_GRAD_ACCUMULATE));
        for (int64_t j = 0; j < o; j++) {
            double rb = pass ? widen(dt, old[n_w + (size_t)j]) : 0, mb = fabs(rb);
            for (int64_t k = 0; k < in; k++) {
                double ref = pass ? widen(dt, old[j * in + k]) : 0, mag = fabs(ref);
                for (int64_t i = 0; i < m; i++) ref += dy[i * o + j] * x[i * in + k], mag += fabs(dy[i * o + j] * x[i * in + k]);
                bad += !within(dt, widen(dt, hdw[j * in + k]), ref, mag, m);
            }
            for (int64_t i = 0; i < m; i++) rb += dy[i * o + j], mb += fabs(dy[i * o + j]);
            bad += !within(dt, widen(dt, hdb[j]), rb, mb, m);
        }
        free(old);
        memcpy(out + written, hdw, n_w * 2), written += n_w * 2;
        memcpy(out + written, hdb, (size_t)o * 2), written += (size_t)o * 2;
    }
    if (bad) {
        fprintf(stderr, "%s m=%lld in=%lld out=%lld bias=%d fortran=%d: %d elements outside the bound\n",
                tp_dtype_name(dt), (long long)m, (long long)in, (long long)o, with_bias, fortran_x, bad);
        tp_test_failures++;
    }
    free(hx); free(hxs); free(hw); free(hb); free(hdy); free(hy); free(hdx); free(hdw); free(hdb);
    free(x); free(w); free(b); free(dy);
    return written;
}

static size_t run_all(char *out)
{
    size_t at = 0;
    for (int d = 0; d < 2; d++)
        for (size_t s = 0; s < NSHAPES; s++)
            for (int bias = 0; bias < 2; bias++)
                for (int f = 0; f < 2; f++) at += run_case(d ? TP_FLOAT16 : TP_BFLOAT16, SHAPES[s], bias, f, out + at);
    return at;
}

static void test_errors(void)
{
    uint16_t x[6] = {0}, w[6] = {0}, y[4] = {0};
    float wf[6] = {0};
    tp_tensor X, W, WF, Y, XH;
    EXPECT_OK(tp_tensor_init(&X, x, TP_BFLOAT16, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&XH, x, TP_FLOAT16, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&W, w, TP_BFLOAT16, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&WF, wf, TP_FLOAT32, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&Y, y, TP_BFLOAT16, 2, (int64_t[]){2, 2}));
    EXPECT_STATUS(tp_linear_forward(&X, &WF, NULL, &Y), TP_ERR_TYPE); /* mixed dtypes are refused */
    EXPECT_STATUS(tp_linear_forward(&XH, &W, NULL, &Y), TP_ERR_TYPE);
    EXPECT(strstr(tp_last_error(), "float16") != NULL && strstr(tp_last_error(), "bfloat16") != NULL);
}

int main(void)
{
    size_t cap = 64u << 20;
    char *plain = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char *fast = malloc(cap);
    size_t n_fast;
    pid_t pid;
    int status = 0;
    EXPECT(plain != MAP_FAILED && fast != NULL);
    tp_set_num_threads(1);
    /* the child reads the knob first, so it is forked before this process reads any */
    pid = fork();
    if (pid == 0) {
        setenv("TPLINEAR_HALF_SIMD", "0", 1);
        run_all(plain);
        _exit(tp_test_failures ? 1 : 0);
    }
    EXPECT(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    n_fast = run_all(fast);
    EXPECT(n_fast < cap && memcmp(plain, fast, n_fast) == 0);
    if (!tp_half_simd_usable(TP_BFLOAT16) || !tp_half_simd_usable(TP_FLOAT16))
        fprintf(stderr, "note: this CPU lacks AVX2/F16C: both paths were plain C\n");
    test_widen_all(TP_BFLOAT16);
    test_widen_all(TP_FLOAT16);
    test_narrow(TP_BFLOAT16);
    test_narrow(TP_FLOAT16);
    test_errors();
    munmap(plain, cap);
    free(fast);
    TEST_MAIN_END();
}
