/* The sequence-parallel pairs and the vocab-parallel embedding and cross-entropy (csrc/layers/sequence.c,
 * vocab.c) in worlds of 1-4 forked ranks against naive float64 loops, with a sequence and a vocabulary no
 * group size divides, the pipelined forward and the overlapped backward (helper threads, under ASan too). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "world.h"

enum { S = 7, B = 2, IN = 5, OUT = 6, V = 11, H = 4 };

/* deterministic values in [-1, 1) */
static double v(int salt, int i) { return (double)((i * 37 + salt * 101 + 13) % 97) / 48.5 - 1.0; }

static void fill(double *a, int n, int salt)
{
    for (int i = 0; i < n; i++) a[i] = v(salt, i);
}

static int near(const double *got, const double *want, int n)
{
    for (int i = 0; i < n; i++)
        if (fabs(got[i] - want[i]) > 1e-12 * (1.0 + fabs(want[i]))) {
            fprintf(stderr, "element %d: %.17g != %.17g\n", i, got[i], want[i]);
            return 0;
        }
    return 1;
}

static tp_tensor t3(double *data, int64_t a, int64_t b, int64_t c)
{
    tp_tensor t;
    int64_t shape[3] = {a, b, c};
    tp_tensor_init(&t, data, TP_FLOAT64, 3, shape);
    return t;
}

static tp_tensor t2(double *data, int64_t a, int64_t b)
{
    tp_tensor t;
    int64_t shape[2] = {a, b};
    tp_tensor_init(&t, data, TP_FLOAT64, 2, shape);
    return t;
}

static tp_tensor t1(void *data, tp_dtype dt, int64_t a)
{
    tp_tensor t;
    tp_tensor_init(&t, data, dt, 1, &a);
    return t;
}

static int layers(tp_group *g, int r, int p)
{
    tp_range seq[4], cols[4], ins[4];
    tp_split_spec spec = {.grain = 1};
    double x[S * B * IN], w[OUT * IN], b[OUT], dy[S * B * OUT], y[S * B * OUT], dx[S * B * IN], dw[OUT * IN];
    double db[OUT];
    EXPECT_OK(tp_partition(S, p, &spec, seq));
    EXPECT_OK(tp_partition(OUT, p, &spec, cols));
    EXPECT_OK(tp_partition(IN, p, &spec, ins));
    fill(x, S * B * IN, 1);
    fill(w, OUT * IN, 2);
    fill(b, OUT, 3);
    fill(dy, S * B * OUT, 4);
    /* the whole layer in float64 loops */
    for (int i = 0; i < S * B; i++)
        for (int o = 0; o < OUT; o++) {
            y[i * OUT + o] = b[o];
            for (int k = 0; k < IN; k++) y[i * OUT + o] += x[i * IN + k] * w[o * IN + k];
        }
    for (int i = 0; i < S * B; i++)
        for (int k = 0; k < IN; k++) {
            dx[i * IN + k] = 0;
            for (int o = 0; o < OUT; o++) dx[i * IN + k] += dy[i * OUT + o] * w[o * IN + k];
        }
    for (int o = 0; o < OUT; o++) {
        db[o] = 0;
        for (int i = 0; i < S * B; i++) db[o] += dy[i * OUT + o];
        for (int k = 0; k < IN; k++) {
            dw[o * IN + k] = 0;
            for (int i = 0; i < S * B; i++) dw[o * IN + k] += dy[i * OUT + o] * x[i * IN + k];
        }
    }
    int64_t rows = seq[r].size, r0 = seq[r].offset, c0 = cols[r].offset, nc = cols[r].size;
    int64_t i0 = ins[r].offset, ni = ins[r].size;
    /* column layer: this rank's rows in, every row's shard of the features out */
    for (int mode = 0; mode < 4; mode++) { /* chunks 0 / 3, overlap 0 / 1 */
        double *wr = calloc(OUT * IN, sizeof *wr), *br = calloc(OUT, sizeof *br);
        double *yr = calloc(S * B * OUT + 1, sizeof *yr), *dyr = calloc(S * B * OUT + 1, sizeof *dyr);
        double *dxr = calloc(S * B * IN + 1, sizeof *dxr), *dwr = calloc(OUT * IN, sizeof *dwr);
        double *dbr = calloc(OUT, sizeof *dbr), want[S * B * OUT];
        if (!wr || !br || !yr || !dyr || !dxr || !dwr || !dbr) return 1;
        for (int o = 0; o < nc; o++) {
            memcpy(wr + o * IN, w + (c0 + o) * IN, IN * sizeof *w);
            br[o] = b[c0 + o];
        }
        for (int i = 0; i < S * B; i++)
            for (int o = 0; o < nc; o++) dyr[i * nc + o] = dy[i * OUT + c0 + o];
        tp_tensor tx = t3(x + r0 * B * IN, rows, B, IN), tw = t2(wr, nc, IN), tb = t1(br, TP_FLOAT64, nc);
        tp_tensor ty = t3(yr, S, B, nc), tdy = t3(dyr, S, B, nc), tdx = t3(dxr, rows, B, IN), tdw = t2(dwr, nc, IN);
        tp_tensor tdb = t1(dbr, TP_FLOAT64, nc);
        EXPECT_OK(tp_col_forward_sp(g, &tx, &tw, &tb, seq, &ty, (mode & 1) ? 3 : 0));
        for (int i = 0; i < S * B; i++)
            for (int o = 0; o < nc; o++) want[i * nc + o] = y[i * OUT + c0 + o];
        EXPECT(near(yr, want, S * B * (int)nc));
        EXPECT_OK(tp_col_backward_sp(g, &tdy, &tx, &tw, seq, &tdx, &tdw, &tdb, mode >> 1));
        EXPECT(near(dxr, dx + r0 * B * IN, (int)rows * B * IN));
        EXPECT(near(dwr, dw + c0 * IN, (int)nc * IN));
        EXPECT(near(dbr, db + c0, (int)nc));
        free(wr); free(br); free(yr); free(dyr); free(dxr); free(dwr); free(dbr);
    }
    /* row layer: the whole sequence of this rank's features in, this rank's rows out */
    {
        double *xr = calloc(S * B * IN + 1, sizeof *xr), *wr = calloc(OUT * IN + 1, sizeof *wr);
        double *yr = calloc(S * B * OUT + 1, sizeof *yr), *dxr = calloc(S * B * IN + 1, sizeof *dxr);
        double *dwr = calloc(OUT * IN + 1, sizeof *dwr), dbr[OUT] = {0};
        if (!xr || !wr || !yr || !dxr || !dwr) return 1;
        for (int i = 0; i < S * B; i++) memcpy(xr + i * ni, x + i * IN + i0, (size_t)ni * sizeof *x);
        for (int o = 0; o < OUT; o++) memcpy(wr + o * ni, w + o * IN + i0, (size_t)ni * sizeof *w);
        tp_tensor tx = t3(xr, S, B, ni), tw = t2(wr, OUT, ni), tb = t1(b, TP_FLOAT64, OUT);
        tp_tensor ty = t3(yr, rows, B, OUT), tdy = t3(dy + r0 * B * OUT, rows, B, OUT), tdx = t3(dxr, S, B, ni);
        tp_tensor tdw = t2(dwr, OUT, ni), tdb = t1(dbr, TP_FLOAT64, OUT);
        double want[S * B * IN];
        EXPECT_OK(tp_row_forward_sp(g, &tx, &tw, &tb, seq, &ty));
        EXPECT(near(yr, y + r0 * B * OUT, (int)rows * B * OUT));
        EXPECT_OK(tp_row_backward_sp(g, &tdy, &tx, &tw, seq, &tdx, &tdw, &tdb));
        for (int i = 0; i < S * B; i++)
            for (int k = 0; k < ni; k++) want[i * ni + k] = dx[i * IN + i0 + k];
        EXPECT(near(dxr, want, S * B * (int)ni));
        for (int o = 0; o < OUT; o++)
            for (int k = 0; k < ni; k++) want[o * ni + k] = dw[o * IN + i0 + k];
        EXPECT(near(dwr, want, OUT * (int)ni));
        EXPECT(near(dbr, db, OUT)); /* the replicated bias: the whole gradient */
        /* a row count that is not this rank's fails before any collective */
        tp_tensor bad = t3(yr, rows + 1, B, OUT);
        EXPECT_STATUS(tp_row_forward_sp(g, &tx, &tw, &tb, seq, &bad), TP_ERR_VALUE);
        free(xr); free(wr); free(yr); free(dxr); free(dwr);
    }
    return 0;
}

static int vocab(tp_group *g, int r, int p)
{
    tp_range rows[4], seq[4];
    tp_split_spec spec = {.grain = 1};
    int64_t ids[S * B];
    double table[V * H], logits[S * B * V];
    EXPECT_OK(tp_partition(V, p, &spec, rows));
    EXPECT_OK(tp_partition(S, p, &spec, seq));
    fill(table, V * H, 5);
    fill(logits, S * B * V, 6);
    for (int i = 0; i < S * B; i++) ids[i] = (i * 5 + 3) % V;
    int64_t v0 = rows[r].offset, nv = rows[r].size;
    tp_tensor tids, tt;
    int64_t idshape[2] = {S, B};
    tp_tensor_init(&tids, ids, TP_INT64, 2, idshape);
    /* embedding, all-reduced and reduce-scattered */
    for (int sp = 0; sp < 2; sp++) {
        double y[S * B * H], dw[V * H + 1] = {0}, want[V * H] = {0}, dy[S * B * H];
        int64_t n = sp ? seq[r].size : S, at = sp ? seq[r].offset : 0;
        tp_tensor tw = t2(table + v0 * H, nv, H), ty = t3(y, n, B, H), tdw = t2(dw, nv, H);
        tp_tensor tdy = t3(dy + at * B * H, n, B, H);
        fill(dy, S * B * H, 7);
        EXPECT_OK(tp_embedding_forward(g, &tids, &tw, v0, V, sp ? seq : NULL, &ty));
        for (int i = 0; i < n * B; i++) EXPECT(near(y + i * H, table + ids[at * B + i] * H, H));
        EXPECT_OK(tp_embedding_backward(g, &tids, &tdy, v0, sp ? seq : NULL, &tdw));
        for (int i = 0; i < S * B; i++)
            for (int j = 0; j < H; j++) want[ids[i] * H + j] += dy[i * H + j];
        EXPECT(near(dw, want + v0 * H, (int)nv * H));
    }
    ids[3] = V; /* out of range: refused on every rank before any collective */
    {
        double y[S * B * H];
        tp_tensor tw = t2(table + v0 * H, nv, H), ty = t3(y, S, B, H);
        EXPECT_STATUS(tp_embedding_forward(g, &tids, &tw, v0, V, NULL, &ty), TP_ERR_VALUE);
    }
    /* cross-entropy with label smoothing and an ignored target */
    {
        int64_t t[S * B];
        double lr[S * B * V], grad[S * B * V], losses[S * B], loss = 0, want_loss = 0, e = 0.1;
        int valid = 0;
        for (int i = 0; i < S * B; i++) t[i] = i == 4 ? -100 : (i * 3 + 1) % V;
        for (int i = 0; i < S * B; i++)
            for (int c = 0; c < nv; c++) lr[i * nv + c] = logits[i * V + v0 + c] * 20.0;
        tp_tensor tl = t3(lr, S, B, nv), tg = t3(grad, S, B, nv), tls;
        tp_tensor_init(&tt, t, TP_INT64, 2, idshape);
        tp_tensor_init(&tls, losses, TP_FLOAT64, 2, idshape);
        EXPECT_OK(tp_vocab_cross_entropy(g, &tl, &tt, v0, V, -100, e, TP_LOSS_MEAN, &tls, &tg, &loss));
        for (int i = 0; i < S * B; i++) valid += t[i] != -100;
        for (int i = 0; i < S * B; i++) {
            double m = -INFINITY, se = 0, sl = 0, li;
            if (t[i] == -100) {
                EXPECT(losses[i] == 0.0);
                for (int c = 0; c < nv; c++) EXPECT(grad[i * nv + c] == 0.0);
                continue;
            }
            for (int c = 0; c < V; c++) m = fmax(m, 20.0 * logits[i * V + c]);
            for (int c = 0; c < V; c++) se += exp(20.0 * logits[i * V + c] - m), sl += 20.0 * logits[i * V + c];
            li = (1 - e) * (m + log(se) - 20.0 * logits[i * V + t[i]]) + e * (m + log(se) - sl / V);
            EXPECT(fabs(losses[i] - li) < 1e-12 * (1 + fabs(li)));
            want_loss += li / valid;
            for (int c = 0; c < nv; c++) {
                double pc = exp(20.0 * logits[i * V + v0 + c] - m) / se;
                double gc = (pc - e / V - (v0 + c == t[i] ? 1 - e : 0)) / valid;
                EXPECT(fabs(grad[i * nv + c] - gc) < 1e-13);
            }
        }
        EXPECT(fabs(loss - want_loss) < 1e-12 * (1 + fabs(want_loss)));
        /* in place: the gradient over the logits themselves */
        EXPECT_OK(tp_vocab_cross_entropy(g, &tl, &tt, v0, V, -100, e, TP_LOSS_MEAN, NULL, &tl, &loss));
        EXPECT(near(lr, grad, S * B * (int)nv));
        t[0] = V;
        EXPECT_STATUS(tp_vocab_cross_entropy(g, &tl, &tt, v0, V, -100, e, TP_LOSS_MEAN, NULL, NULL, &loss),
                      TP_ERR_VALUE);
    }
    return 0;
}

static int world(int rank, int size, int port)
{
    tp_group *g = NULL;
    EXPECT_OK(world_init(rank, size, port, 30.0, &g));
    if (g == NULL) return 1;
    if (layers(g, rank, size) != 0 || vocab(g, rank, size) != 0) tp_test_failures++;
    EXPECT_OK(tp_barrier(g));
    tp_group_destroy(g);
    return tp_test_failures;
}

int main(void)
{
    setenv("TPLINEAR_SHM_SLOT_KB", "16", 1);
    for (int size = 1; size <= 4; size++) EXPECT(run_world(size, world, -1) == 0);
    TEST_MAIN_END();
}
