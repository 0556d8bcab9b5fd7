/* Dense linear algebra of one rank: tensor -> matrix views, device dispatch, and the four linear ops. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"

tp_status tp_mat_view(const tp_tensor *t, tp_mat *m, void **packed, const char *what)
{
    tp_status st = TP_OK;
    int nd = t->ndim;
    int64_t rows = 1, cols, lead_stride = 0;
    int collapsible = 1;
    TP_REQUIRE(nd >= 1, "%s must have at least 1 dimension, got a 0-d array", what);
    cols = t->shape[nd - 1];
    for (int d = 0; d < nd - 1; d++) rows *= t->shape[d];
    memset(m, 0, sizeof *m);
    m->rows = rows;
    m->cols = cols;
    m->dtype = t->dtype;
    m->device = t->device;
    m->data = t->data;
    if (packed) *packed = NULL;
    /* Leading dims collapse into one when each outer stride steps over the whole inner block;
     * the row stride is then the stride of the innermost non-trivial leading dim. */
    {
        int64_t expect = -1;
        for (int d = nd - 2; d >= 0; d--) {
            if (t->shape[d] == 1) continue;
            if (expect < 0)
                lead_stride = t->strides[d];
            else if (t->strides[d] != expect)
                collapsible = 0;
            expect = t->strides[d] * t->shape[d];
        }
    }
    if (rows <= 1) lead_stride = cols;
    if (rows == 0 || cols == 0) { /* nothing is read or written: any layout will do */
        m->ld = cols > 1 ? cols : 1;
        goto out;
    }
    if (collapsible && (cols <= 1 || t->strides[nd - 1] == 1) && lead_stride >= (cols > 1 ? cols : 1)) {
        m->ld = lead_stride;
        m->trans = 0;
        goto out;
    }
    /* A 2-d column-major (Fortran) array is a transposed row-major one. */
    if (nd == 2 && (rows <= 1 || t->strides[0] == 1) && t->strides[1] >= (rows > 1 ? rows : 1)) {
        m->ld = t->strides[1];
        m->trans = 1;
        goto out;
    }
    TP_REQUIRE(packed != NULL, "%s must be contiguous in its last dimension", what);
    { /* packed where t lives: host memory, or on the GPU (e.g. torch's expand()ed dY, strides 0) */
        tp_tensor dst;
        size_t bytes = (size_t)(rows * cols) * tp_dtype_size(t->dtype);
        TP_CHECK(tp_device_alloc(t->device, bytes, packed));
        TP_CHECK(tp_tensor_init(&dst, *packed, t->dtype, nd, t->shape));
        dst.device = t->device;
        TP_CHECK(tp_tensor_copy(&dst, t));
        m->data = *packed;
        m->ld = cols > 1 ? cols : 1;
        m->trans = 0;
    }
out:
    if (st != TP_OK && packed && *packed) {
        tp_device_free(t->device, *packed);
        *packed = NULL;
    }
    return st;
}

uint32_t tp_gemm_alignment(const void *p)
{
    uintptr_t a = (uintptr_t)p;
    uint32_t align = 256;
    while (align > 1 && a % align != 0) align /= 2;
    return align;
}

/* The provider for the memory of m's device. */
static tp_status provider(const tp_mat *m, const tp_gemm_provider **out)
{
    if (m->device.type == TP_DEVICE_CPU) {
        *out = &tp_gemm_openblas;
        return TP_OK;
    }
#if TPLINEAR_CUDA
    if (m->device.type == TP_DEVICE_CUDA) {
        *out = &tp_gemm_cublas;
        return TP_OK;
    }
#endif
    return tp_error(TP_ERR_UNSUPPORTED, "GEMM on %s memory: tplinear was built without CUDA (set TPLINEAR_CUDA=1 "
                    "and a CUDA toolkit)", tp_device_kind(m->device));
}

tp_status tp_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate)
{
    const tp_gemm_provider *p = NULL;
    tp_status st = provider(c, &p);
    return st != TP_OK ? st : p->gemm(a, ta, b, tb, c, accumulate);
}

/* ---------------------------------------------------------------- argument checks */

static tp_status check_operand(const tp_tensor *ref, const tp_tensor *t, const char *what)
{
    if (t->dtype != ref->dtype)
        return tp_error(TP_ERR_TYPE, "%s has dtype %s, expected %s like the weight", what,
                        tp_dtype_name(t->dtype), tp_dtype_name(ref->dtype));
    if (!tp_device_same(ref->device, t->device))
        return tp_error(TP_ERR_VALUE, "%s is on %s:%d but the weight is on %s:%d", what, tp_device_kind(t->device),
                        t->device.index, tp_device_kind(ref->device), ref->device.index);
    return TP_OK;
}

/* Checks a weight [out, in] and optional bias [out]. */
static tp_status check_weight(const tp_tensor *w, const tp_tensor *b)
{
    tp_status st = TP_OK;
    TP_REQUIRE(w->ndim == 2, "weight must be 2-d [out_features, in_features], got %d-d", w->ndim);
    if (b) {
        TP_CHECK(check_operand(w, b, "bias"));
        TP_REQUIRE(b->ndim == 1 && b->shape[0] == w->shape[0],
                   "bias must be 1-d of size %lld (the weight's out_features), got %d-d of size %lld",
                   (long long)w->shape[0], b->ndim, (long long)(b->ndim ? b->shape[0] : 1));
        TP_REQUIRE(b->strides[0] == 1 || b->shape[0] <= 1, "bias must be contiguous");
    }
out:
    return st;
}

/* t is [..., width]; out (if any) is [..., out_width] with the same leading dims. */
static tp_status check_batch(const tp_tensor *t, int64_t width, const char *what, const char *dimname)
{
    tp_status st = TP_OK;
    TP_REQUIRE(t->ndim >= 1, "%s must have at least 1 dimension, got a 0-d array", what);
    TP_REQUIRE(t->shape[t->ndim - 1] == width, "%s's last dimension must be %lld (%s), got %lld", what,
               (long long)width, dimname, (long long)t->shape[t->ndim - 1]);
out:
    return st;
}

static tp_status check_same_lead(const tp_tensor *a, const tp_tensor *b, const char *wa, const char *wb)
{
    tp_status st = TP_OK;
    TP_REQUIRE(a->ndim == b->ndim, "%s has %d dims but %s has %d", wb, b->ndim, wa, a->ndim);
    for (int d = 0; d < a->ndim - 1; d++)
        TP_REQUIRE(a->shape[d] == b->shape[d], "%s's dim %d is %lld but %s's is %lld", wb, d,
                   (long long)b->shape[d], wa, (long long)a->shape[d]);
out:
    return st;
}

/* ---------------------------------------------------------------- the linear ops */

tp_status tp_linear_check(const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, const tp_tensor *y)
{
    tp_status st = TP_OK;
    TP_CHECK(check_weight(w, b));
    TP_CHECK(check_operand(w, x, "input"));
    TP_CHECK(check_operand(w, y, "output"));
    TP_CHECK(check_batch(x, w->shape[1], "input", "in_features"));
    TP_CHECK(check_batch(y, w->shape[0], "output", "out_features"));
    TP_CHECK(check_same_lead(x, y, "input", "output"));
out:
    return st;
}

tp_status tp_linear_forward(const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, tp_tensor *y)
{
    tp_status st = TP_OK;
    tp_mat mx, mw, my;
    void *px = NULL;
    const tp_gemm_provider *p = NULL;
    TP_CHECK(tp_linear_check(x, w, b, y));
    TP_CHECK(tp_mat_view(x, &mx, &px, "input"));
    TP_CHECK(tp_mat_view(w, &mw, NULL, "weight"));
    TP_CHECK(tp_mat_view(y, &my, NULL, "output"));
    TP_CHECK(provider(&my, &p));
    if (b)
        TP_CHECK(p->gemm_bias(&mx, 0, &mw, 1, &my, b->data));
    else
        TP_CHECK(p->gemm(&mx, 0, &mw, 1, &my, 0));
out:
    tp_device_free(x->device, px);
    return st;
}

tp_status tp_linear_backward_input(const tp_tensor *dy, const tp_tensor *w, tp_tensor *dx)
{
    tp_status st = TP_OK;
    tp_mat mdy, mw, mdx;
    void *pdy = NULL;
    TP_CHECK(check_weight(w, NULL));
    TP_CHECK(check_operand(w, dy, "grad_output"));
    TP_CHECK(check_operand(w, dx, "grad_input"));
    TP_CHECK(check_batch(dy, w->shape[0], "grad_output", "out_features"));
    TP_CHECK(check_batch(dx, w->shape[1], "grad_input", "in_features"));
    TP_CHECK(check_same_lead(dx, dy, "input", "grad_output"));
    TP_CHECK(tp_mat_view(dy, &mdy, &pdy, "grad_output"));
    TP_CHECK(tp_mat_view(w, &mw, NULL, "weight"));
    TP_CHECK(tp_mat_view(dx, &mdx, NULL, "grad_input"));
    TP_CHECK(tp_gemm(&mdy, 0, &mw, 0, &mdx, 0));
out:
    tp_device_free(dy->device, pdy);
    return st;
}

tp_status tp_grad_mode_check(tp_grad_mode mode)
{
    if (mode != TP_GRAD_ACCUMULATE && mode != TP_GRAD_ASSIGN)
        return tp_error(TP_ERR_VALUE, "gradient mode must be TP_GRAD_ACCUMULATE or TP_GRAD_ASSIGN, got %d", (int)mode);
    return TP_OK;
}

tp_status tp_linear_backward_params_mode(const tp_tensor *dy, const tp_tensor *x, tp_tensor *dw, tp_tensor *db,
                                        tp_grad_mode mode)
{
    tp_status st = TP_OK;
    tp_mat mdy, mx, mdw;
    void *pdy = NULL, *px = NULL;
    const tp_gemm_provider *p = NULL;
    int accumulate = mode == TP_GRAD_ACCUMULATE;
    TP_CHECK(tp_grad_mode_check(mode));
    TP_CHECK(check_weight(dw, db));
    TP_CHECK(check_operand(dw, dy, "grad_output"));
    TP_CHECK(check_operand(dw, x, "input"));
    TP_CHECK(check_batch(dy, dw->shape[0], "grad_output", "out_features"));
    TP_CHECK(check_batch(x, dw->shape[1], "input", "in_features"));
    TP_CHECK(check_same_lead(x, dy, "input", "grad_output"));
    TP_CHECK(tp_mat_view(dy, &mdy, &pdy, "grad_output"));
    TP_CHECK(tp_mat_view(x, &mx, &px, "input"));
    TP_CHECK(tp_mat_view(dw, &mdw, NULL, "weight grad"));
    TP_CHECK(provider(&mdw, &p));
    TP_CHECK(p->gemm(&mdy, 1, &mx, 0, &mdw, accumulate));
    if (db) TP_CHECK(p->col_sums(&mdy, db->data, accumulate));
out:
    tp_device_free(dy->device, pdy);
    tp_device_free(x->device, px);
    return st;
}

tp_status tp_linear_backward_params(const tp_tensor *dy, const tp_tensor *x, tp_tensor *dw, tp_tensor *db)
{
    return tp_linear_backward_params_mode(dy, x, dw, db, TP_GRAD_ACCUMULATE);
}

tp_status tp_add_bias(tp_tensor *y, const tp_tensor *b)
{
    tp_status st = TP_OK;
    tp_mat my;
    const tp_gemm_provider *p = NULL;
    TP_CHECK(check_operand(y, b, "bias"));
    TP_REQUIRE(b->ndim == 1 && y->ndim >= 1 && b->shape[0] == y->shape[y->ndim - 1],
               "bias of size %lld does not match the output width %lld", (long long)(b->ndim ? b->shape[0] : 0),
               (long long)(y->ndim ? y->shape[y->ndim - 1] : 0));
    TP_CHECK(tp_mat_view(y, &my, NULL, "output"));
    TP_CHECK(provider(&my, &p));
    TP_CHECK(p->rows(&my, b->data, 1));
out:
    return st;
}
