/* A row-parallel linear layer's forward pass written against the C API alone.
 *
 * Every rank holds the columns [off, off + size) of W (in-features split) and the same slice of the
 * input; tp_row_forward multiplies and all-reduces, adding the bias once. Run it as one process
 * (a world of one), or several under the launcher: `python -m tplinear.run --nproc-per-node N --no-python
 * examples/c/row_forward` (`make -C examples/c run2`). Prints one line per rank and exits 0 when the
 * result matches a naive loop over the full layer.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "tplinear.h"

enum { BATCH = 4, IN = 96, OUT = 10 };

static int fail(const char *what, tp_status st)
{
    fprintf(stderr, "%s failed: %s: %s\n", what, tp_status_name(st), tp_last_error());
    return 1;
}

int main(void)
{
    tp_init_options opts = TP_INIT_OPTIONS_INITIALIZER; /* rank and world from the environment (torchrun's) */
    tp_group *world = NULL;
    tp_status st;
    tp_range *ranges = NULL;
    float *w_full = NULL, *w_shard = NULL, *x = NULL, *bias = NULL, *y = NULL;
    tp_tensor W, X, XS, B, Y;
    int rc = 1, rank, size;
    double err = 0;

    if ((st = tp_group_init_world(&opts, &world)) != TP_OK) return fail("tp_group_init_world", st);
    rank = tp_group_rank(world);
    size = tp_group_size(world);
    ranges = calloc((size_t)size, sizeof *ranges);
    w_full = malloc(sizeof(float) * OUT * IN);
    x = malloc(sizeof(float) * BATCH * IN);
    bias = malloc(sizeof(float) * OUT);
    y = malloc(sizeof(float) * BATCH * OUT);
    if (!ranges || !w_full || !x || !bias || !y) goto done;

    /* every rank builds the same full layer from the counter-based generator, then keeps its columns */
    if ((st = tp_tensor_init(&W, w_full, TP_FLOAT32, 2, (int64_t[]){OUT, IN})) != TP_OK ||
        (st = tp_init_uniform(&W, 7, 0, 1.0 / sqrt(IN), 0, 0, IN)) != TP_OK ||
        (st = tp_tensor_init(&B, bias, TP_FLOAT32, 1, (int64_t[]){OUT})) != TP_OK ||
        (st = tp_init_uniform(&B, 7, 1, 1.0 / sqrt(IN), 0, 0, OUT)) != TP_OK ||
        (st = tp_tensor_init(&X, x, TP_FLOAT32, 2, (int64_t[]){BATCH, IN})) != TP_OK ||
        (st = tp_init_uniform(&X, 99, 0, 1.0, 0, 0, IN)) != TP_OK ||
        (st = tp_partition(IN, size, &(tp_split_spec){.grain = TP_GRAIN_INFERENCE}, ranges)) != TP_OK) {
        rc = fail("setup", st);
        goto done;
    }
    w_shard = malloc(sizeof(float) * OUT * (size_t)(ranges[rank].size ? ranges[rank].size : 1));
    if (w_shard == NULL) goto done;
    {
        tp_tensor view, shard;
        if ((st = tp_tensor_narrow(&W, 1, ranges[rank].offset, ranges[rank].size, &view)) != TP_OK ||
            (st = tp_tensor_init(&shard, w_shard, TP_FLOAT32, 2, (int64_t[]){OUT, ranges[rank].size})) != TP_OK ||
            (st = tp_tensor_copy(&shard, &view)) != TP_OK ||
            (st = tp_tensor_narrow(&X, 1, ranges[rank].offset, ranges[rank].size, &XS)) != TP_OK ||
            (st = tp_tensor_init(&Y, y, TP_FLOAT32, 2, (int64_t[]){BATCH, OUT})) != TP_OK ||
            (st = tp_row_forward(world, &XS, &shard, &B, &Y)) != TP_OK) {
            rc = fail("row forward", st);
            goto done;
        }
    }
    for (int i = 0; i < BATCH; i++)
        for (int o = 0; o < OUT; o++) {
            double ref = bias[o];
            for (int k = 0; k < IN; k++) ref += (double)x[i * IN + k] * w_full[o * IN + k];
            err = fmax(err, fabs(ref - y[i * OUT + o]));
        }
    printf("rank %d of %d: columns [%lld, %lld), y[0][0] = %.6f, max error vs full layer %.2e\n", rank, size,
           (long long)ranges[rank].offset, (long long)(ranges[rank].offset + ranges[rank].size), y[0], err);
    rc = err < 1e-4 ? 0 : 1;
done:
    free(ranges);
    free(w_full);
    free(w_shard);
    free(x);
    free(bias);
    free(y);
    tp_group_destroy(world);
    return rc;
}
