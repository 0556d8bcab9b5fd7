/* GPU GEMMs through cuBLAS / cuBLASLt on the current stream, and the per-device cuBLAS handles.
 *
 * tp_mat is row-major; cuBLAS is column-major. A row-major [r, c] matrix with leading dimension ld is
 * the column-major [c, r] matrix with the same ld, so C = op(A) op(B) (row-major) is computed as the
 * column-major C^T = op(B)^T op(A)^T: cuBLAS's "A" is our B, its "B" is our A, M = n, N = m.
 *
 * Precision: float32 (TF32 tensor cores only with tp_cuda_set_allow_tf32(1)), float64, and float16 /
 * bfloat16 with float32 accumulation and float32 alpha/beta. Only compiled into TPLINEAR_CUDA builds. */
#include <limits.h>
#include <stdint.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cublas_v2.h>

#include "../device/cuda.h"
#include "gemm.h"

/* Checks a cuBLAS / cuBLASLt call; on failure records "what: name (string)" and jumps to out. */
#define TP_CUBLAS(expr, what)                                                                \
    do {                                                                                     \
        cublasStatus_t b_ = (expr);                                                          \
        if (b_ != CUBLAS_STATUS_SUCCESS) {                                                   \
            st = tp_error(TP_ERR_CUDA, "%s: %s (%s)", (what), cublasGetStatusName(b_),       \
                          cublasGetStatusString(b_));                                        \
            goto out;                                                                        \
        }                                                                                    \
    } while (0)

/* ---------------------------------------------------------------- per-device handles */

#define MAX_DEVICES TP_CUDA_MAX_DEVICES
#define MAX_STREAMS 8 /* workspaces per device; a ninth stream takes over the least recently used one */
#define WORKSPACE_BYTES ((size_t)32 << 20) /* what cuBLAS recommends for Hopper; enough for earlier GPUs */
/* what the device's default memory pool keeps after a synchronisation (the rest goes back to the driver,
 * where torch's allocator can use it) */
#define POOL_KEEP_BYTES ((uint64_t)256 << 20)

/* A cuBLAS / cuBLASLt workspace of one (device, stream): one buffer used by two streams at once races.
 * mem is stream-ordered memory of the device's pool; used is recorded on the stream after each GEMM that
 * reads it, and every GEMM that binds the slot first makes its stream wait for used. That wait costs nothing
 * on the same stream, and it keeps a slot safe when tplinear cannot see a stream go: a user's stream
 * destroyed while its work is pending, whose handle CUDA then hands to a new stream, finds the slot by that
 * handle and runs after the old stream's last GEMM on it. A slot is released (freed ordered after its last
 * use) when a stream with no slot needs one and all are taken: the least recently used goes, so a stream
 * that set_stream replaced, or that was destroyed, gives its workspace back once newer streams need it. */
typedef struct {
    cudaStream_t stream;
    void *mem;
    cudaEvent_t used;
    uint64_t last; /* the device's clock at its last use */
} ws_slot;

/* Lazily created per-device state. Handles are shared by every thread of the process; calls that set
 * the handle's stream and enqueue hold g_lock. */
typedef struct {
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    ws_slot ws[MAX_STREAMS];
    uint64_t clock; /* counts bind_stream calls, for the least recently used slot */
    void *ones[4];   /* a vector of ones per floating dtype (TP_FLOAT32..TP_BFLOAT16) */
    int64_t ones_len[4];
} cublas_ctx;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static cublas_ctx *g_ctx[MAX_DEVICES];

/* Creates the handles of a device; called with the lock held. */
static tp_status ctx_create(int device, cublas_ctx **out)
{
    tp_status st = TP_OK;
    cublas_ctx *c = calloc(1, sizeof *c);
    cudaMemPool_t pool;
    uint64_t keep = POOL_KEEP_BYTES;
    if (c == NULL) return tp_error(TP_ERR_NOMEM, "out of memory for the CUDA context");
    TP_CUBLAS(cublasCreate(&c->blas), "cublasCreate");
    TP_CUBLAS(cublasLtCreate(&c->lt), "cublasLtCreate");
    TP_CUBLAS(cublasSetPointerMode(c->blas, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
    /* stream-ordered allocations of outputs should not go back to the driver at every sync, but freed scratch
     * beyond POOL_KEEP_BYTES must (never releasing starves torch's caching allocator) */
    if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess)
        (void)cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    (void)cudaGetLastError();
    tp_log(TP_LOG_INFO, "CUDA device %d: cuBLAS ready, workspaces of %zu MiB per stream", device,
           WORKSPACE_BYTES >> 20);
    *out = c;
    c = NULL;
out:
    if (c) {
        if (c->lt) cublasLtDestroy(c->lt);
        if (c->blas) cublasDestroy(c->blas);
        free(c);
    }
    return st;
}

/* The device's handles, with the device made current: the caller restores *prev (tp_cuda_restore_device). */
static tp_status ctx_get(int device, cublas_ctx **ctx, int *prev)
{
    tp_status st = TP_OK;
    TP_CHECK(tp_cuda_use_device(device, prev));
    TP_REQUIRE(device < MAX_DEVICES, "CUDA device %d: at most %d devices are supported", device,
               MAX_DEVICES);
    pthread_mutex_lock(&g_lock);
    if (g_ctx[device] == NULL) st = ctx_create(device, &g_ctx[device]);
    *ctx = g_ctx[device];
    pthread_mutex_unlock(&g_lock);
out:
    return st;
}

/* Puts the handle on the device's current stream with that stream's own workspace slot (cublasSetStream
 * resets the workspace to cuBLAS' default pool), the stream ordered after the slot's last use; *slot is
 * that slot, whose use the caller records with ws_used once its GEMM is enqueued. Caller holds the lock;
 * the device is current. */
static tp_status bind_stream(cublas_ctx *ctx, ws_slot **slot)
{
    tp_status st = TP_OK;
    cudaStream_t s = tp_cuda_stream();
    ws_slot *w = NULL;
    void *mem = NULL;
    int i;
    *slot = NULL;
    TP_CUBLAS(cublasSetStream(ctx->blas, s), "cublasSetStream");
    for (i = 0; i < MAX_STREAMS; i++) {
        ws_slot *c = &ctx->ws[i];
        if (c->mem && c->stream == s) {
            w = c;
            break;
        }
        if (w == NULL || (w->mem && (c->mem == NULL || c->last < w->last))) w = c; /* a free one, else the LRU */
    }
    if (w->used == NULL) TP_CU(cudaEventCreateWithFlags(&w->used, cudaEventDisableTiming), "cudaEventCreate");
    /* after the slot's last use, on whichever stream that was (a no-op when it was this one) */
    TP_CU(cudaStreamWaitEvent(s, w->used, 0), "cudaStreamWaitEvent (cuBLAS workspace)");
    if (w->mem == NULL || w->stream != s) {
        if (w->mem) { /* release the least recently used slot: freed in order after its last use */
            tp_log(TP_LOG_TRACE, "cuBLAS workspace of stream %p released for stream %p", (void *)w->stream,
                   (void *)s);
            TP_CU(cudaFreeAsync(w->mem, s), "cudaFreeAsync (cuBLAS workspace)");
            w->mem = NULL;
        }
        TP_CU(cudaMallocAsync(&mem, WORKSPACE_BYTES, s), "cudaMallocAsync (cuBLAS workspace)");
        w->mem = mem;
        w->stream = s;
    }
    w->last = ++ctx->clock;
    TP_CUBLAS(cublasSetWorkspace(ctx->blas, w->mem, WORKSPACE_BYTES), "cublasSetWorkspace");
    *slot = w;
out:
    return st;
}

/* Records that the GEMM just enqueued on the slot's stream uses its workspace. Caller holds the lock. */
static tp_status ws_used(ws_slot *slot)
{
    tp_status st = TP_OK;
    TP_CU(cudaEventRecord(slot->used, slot->stream), "cudaEventRecord (cuBLAS workspace)");
out:
    return st;
}

/* A device vector of at least n ones of dtype dt (grown on demand, cached). Caller holds the lock. */
static tp_status ones_of(cublas_ctx *ctx, tp_dtype dt, int64_t n, const void **ones)
{
    tp_status st = TP_OK;
    int i = (int)dt;
    size_t item = tp_dtype_size(dt);
    void *host = NULL, *dev = NULL;
    int64_t len;
    TP_REQUIRE(i >= TP_FLOAT32 && i <= TP_BFLOAT16, "no ones vector for dtype %s", tp_dtype_name(dt));
    if (ctx->ones_len[i] >= n && ctx->ones[i]) {
        *ones = ctx->ones[i];
        goto out;
    }
    len = n < 4096 ? 4096 : n + n / 2;
    host = malloc((size_t)len * item);
    if (host == NULL) {
        st = tp_error(TP_ERR_NOMEM, "out of memory for a ones vector of %lld", (long long)len);
        goto out;
    }
    for (int64_t j = 0; j < len; j++) {
        switch (dt) {
        case TP_FLOAT32: ((float *)host)[j] = 1.0f; break;
        case TP_FLOAT64: ((double *)host)[j] = 1.0; break;
        case TP_FLOAT16: ((uint16_t *)host)[j] = 0x3C00; break;
        default: ((uint16_t *)host)[j] = 0x3F80; break; /* bfloat16 */
        }
    }
    TP_CU(cudaMalloc(&dev, (size_t)len * item), "cudaMalloc (ones vector)");
    /* one-time setup, synchronous: the host buffer is freed right after */
    TP_CU(cudaMemcpy(dev, host, (size_t)len * item, cudaMemcpyHostToDevice), "cudaMemcpy (ones vector)");
    if (ctx->ones[i]) {
        /* the old vector may still be read by queued work */
        TP_CU(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        cudaFree(ctx->ones[i]);
    }
    ctx->ones[i] = dev;
    ctx->ones_len[i] = len;
    dev = NULL;
    *ones = ctx->ones[i];
out:
    if (dev) cudaFree(dev);
    free(host);
    return st;
}

/* ---------------------------------------------------------------- GEMMs */

typedef struct {
    cudaDataType_t type;
    cublasComputeType_t compute;
    cudaDataType_t scale;
} gemm_types;

static tp_status types_of(tp_dtype dt, gemm_types *t)
{
    switch (dt) {
    case TP_FLOAT32:
        t->type = CUDA_R_32F;
        t->compute = tp_cuda_get_allow_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
        t->scale = CUDA_R_32F;
        return TP_OK;
    case TP_FLOAT64:
        t->type = CUDA_R_64F;
        t->compute = CUBLAS_COMPUTE_64F;
        t->scale = CUDA_R_64F;
        return TP_OK;
    case TP_FLOAT16:
        t->type = CUDA_R_16F;
        t->compute = CUBLAS_COMPUTE_32F;
        t->scale = CUDA_R_32F;
        return TP_OK;
    case TP_BFLOAT16:
        t->type = CUDA_R_16BF;
        t->compute = CUBLAS_COMPUTE_32F;
        t->scale = CUDA_R_32F;
        return TP_OK;
    default:
        return tp_error(TP_ERR_TYPE, "GPU GEMM supports float32, float64, float16 and bfloat16, got %s",
                        tp_dtype_name(dt));
    }
}

/* alpha / beta in the scale type (host pointers). */
typedef union {
    float f;
    double d;
} scalar;

static const void *scal(const gemm_types *t, scalar *s, double v)
{
    if (t->scale == CUDA_R_64F)
        s->d = v;
    else
        s->f = (float)v;
    return s;
}

static tp_status check_dims(int64_t v, const char *what)
{
    if (v > INT_MAX) return tp_error(TP_ERR_VALUE, "%s %lld exceeds cuBLAS' 32-bit limit", what, (long long)v);
    return TP_OK;
}

static tp_status check_mats(const tp_mat *a, const tp_mat *b, const tp_mat *c)
{
    tp_status st = TP_OK;
    TP_REQUIRE(!c->trans, "gemm: output must be row-major");
    TP_REQUIRE(a->device.type == TP_DEVICE_CUDA && b->device.type == TP_DEVICE_CUDA,
               "gemm: the output is on the GPU but an operand is in host memory");
    TP_REQUIRE(a->device.index == c->device.index && b->device.index == c->device.index,
               "gemm: operands on cuda:%d and cuda:%d, output on cuda:%d", a->device.index, b->device.index,
               c->device.index);
    TP_REQUIRE(a->dtype == c->dtype && b->dtype == c->dtype, "gemm: mixed dtypes %s, %s -> %s",
               tp_dtype_name(a->dtype), tp_dtype_name(b->dtype), tp_dtype_name(c->dtype));
    TP_CHECK(check_dims(c->rows, "rows"));
    TP_CHECK(check_dims(c->cols, "columns"));
    TP_CHECK(check_dims(a->rows > a->cols ? a->rows : a->cols, "inner dimension"));
    TP_CHECK(check_dims(a->ld, "leading dimension"));
    TP_CHECK(check_dims(b->ld, "leading dimension"));
    TP_CHECK(check_dims(c->ld, "leading dimension"));
out:
    return st;
}

/* C = 0 (rows x cols, row-major with ld). */
static tp_status zero_mat(tp_mat *c)
{
    tp_status st = TP_OK;
    size_t item = tp_dtype_size(c->dtype);
    TP_CU(cudaMemset2DAsync(c->data, (size_t)c->ld * item, 0, (size_t)c->cols * item, (size_t)c->rows,
                            tp_cuda_stream()),
          "cudaMemset2DAsync");
out:
    return st;
}

/* The cublasGemmEx call of a row-major C = op(A) op(B) (+ C). Caller holds the lock. */
static tp_status gemm_ex(cublas_ctx *ctx, const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c,
                         double beta)
{
    tp_status st = TP_OK;
    gemm_types t = {CUDA_R_32F, CUBLAS_COMPUTE_32F, CUDA_R_32F};
    scalar sa, sb;
    int64_t m = c->rows, n = c->cols, k = ta ? a->rows : a->cols;
    cublasOperation_t opa = (tb != b->trans) ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t opb = (ta != a->trans) ? CUBLAS_OP_T : CUBLAS_OP_N;
    ws_slot *ws;
    TP_CHECK(types_of(c->dtype, &t));
    TP_CHECK(bind_stream(ctx, &ws));
    TP_CUBLAS(cublasGemmEx(ctx->blas, opa, opb, (int)n, (int)m, (int)k, scal(&t, &sa, 1.0), b->data, t.type,
                           (int)b->ld, a->data, t.type, (int)a->ld, scal(&t, &sb, beta), c->data, t.type,
                           (int)c->ld, t.compute, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx");
    TP_CHECK(ws_used(ws));
out:
    return st;
}

static tp_status cu_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate)
{
    tp_status st = TP_OK;
    int prev = -1;
    cublas_ctx *ctx;
    int64_t k = ta ? a->rows : a->cols;
    TP_CHECK(check_mats(a, b, c));
    if (c->rows == 0 || c->cols == 0) goto out;
    TP_CHECK(ctx_get(c->device.index, &ctx, &prev));
    if (k == 0) {
        if (!accumulate) TP_CHECK(zero_mat(c));
        goto out;
    }
    pthread_mutex_lock(&g_lock);
    st = gemm_ex(ctx, a, ta, b, tb, c, accumulate ? 1.0 : 0.0);
    pthread_mutex_unlock(&g_lock);
out:
    tp_cuda_restore_device(prev);
    return st;
}

/* Each row of C = bias (mode 0) or += bias (mode 1): the rank-1 GEMM C^T (+)= bias * ones^T. */
static tp_status cu_rows(tp_mat *c, const void *bias, int mode)
{
    tp_status st = TP_OK;
    int prev = -1;
    cublas_ctx *ctx;
    const void *ones;
    ws_slot *ws;
    gemm_types t = {CUDA_R_32F, CUBLAS_COMPUTE_32F, CUDA_R_32F};
    scalar sa, sb;
    int locked = 0;
    TP_REQUIRE(!c->trans, "bias: output must be row-major");
    TP_CHECK(check_dims(c->rows, "rows"));
    TP_CHECK(check_dims(c->ld, "leading dimension"));
    if (c->rows == 0 || c->cols == 0) goto out;
    TP_CHECK(types_of(c->dtype, &t));
    TP_CHECK(ctx_get(c->device.index, &ctx, &prev));
    pthread_mutex_lock(&g_lock);
    locked = 1;
    TP_CHECK(ones_of(ctx, c->dtype, c->rows, &ones));
    TP_CHECK(bind_stream(ctx, &ws));
    TP_CUBLAS(cublasGemmEx(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)c->cols, (int)c->rows, 1, scal(&t, &sa, 1.0),
                           bias, t.type, (int)c->cols, ones, t.type, 1, scal(&t, &sb, mode ? 1.0 : 0.0), c->data,
                           t.type, (int)c->ld, t.compute, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx (bias rows)");
    TP_CHECK(ws_used(ws));
out:
    tp_cuda_restore_device(prev);
    if (locked) pthread_mutex_unlock(&g_lock);
    return st;
}

/* out (cols) = A^T ones (+ out when accumulate): a GEMV as a GEMM with N = 1, float32 accumulation for half
 * types. */
static tp_status cu_col_sums(const tp_mat *a, void *out, int accumulate)
{
    tp_status st = TP_OK;
    int prev = -1;
    cublas_ctx *ctx;
    const void *ones;
    ws_slot *ws;
    gemm_types t = {CUDA_R_32F, CUBLAS_COMPUTE_32F, CUDA_R_32F};
    scalar sa, sb;
    int locked = 0;
    TP_CHECK(check_dims(a->rows, "rows"));
    TP_CHECK(check_dims(a->cols, "columns"));
    TP_CHECK(check_dims(a->ld, "leading dimension"));
    if (a->cols == 0) goto out;
    TP_CHECK(ctx_get(a->device.index, &ctx, &prev)); /* also for the memset below: on a's device */
    if (a->rows == 0) { /* an empty sum */
        tp_mat o = {out, 1, a->cols, a->cols, 0, a->dtype, a->device};
        if (!accumulate) TP_CHECK(zero_mat(&o));
        goto out;
    }
    TP_CHECK(types_of(a->dtype, &t));
    pthread_mutex_lock(&g_lock);
    locked = 1;
    TP_CHECK(ones_of(ctx, a->dtype, a->rows, &ones));
    TP_CHECK(bind_stream(ctx, &ws));
    TP_CUBLAS(cublasGemmEx(ctx->blas, a->trans ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, (int)a->cols, 1,
                           (int)a->rows, scal(&t, &sa, 1.0), a->data, t.type, (int)a->ld, ones, t.type,
                           (int)a->rows, scal(&t, &sb, accumulate ? 1.0 : 0.0), out, t.type, (int)a->cols, t.compute,
                           CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx (column sums)");
    TP_CHECK(ws_used(ws));
out:
    tp_cuda_restore_device(prev);
    if (locked) pthread_mutex_unlock(&g_lock);
    return st;
}

/* ---------------------------------------------------------------- bias in the epilogue */

/* C = op(A) op(B) + bias through cuBLASLt's BIAS epilogue (bias broadcast along the rows of the
 * row-major C = the columns of the column-major D), with the operands' real alignments as preferences.
 * Returns TP_ERR_UNSUPPORTED, with no work queued, when cuBLASLt has no algorithm for the case or refuses
 * the one it chose, so that the caller falls back to plain cuBLAS. Caller holds the lock. */
static tp_status lt_bias(cublas_ctx *ctx, const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c,
                         const void *bias)
{
    tp_status st = TP_OK;
    gemm_types t = {CUDA_R_32F, CUBLAS_COMPUTE_32F, CUDA_R_32F};
    scalar sa, sb;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    cublasStatus_t lst;
    uint32_t align[4];
    int found = 0;
    int64_t m = c->rows, n = c->cols, k = ta ? a->rows : a->cols;
    cublasOperation_t opa = (tb != b->trans) ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t opb = (ta != a->trans) ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    ws_slot *slot = NULL;
    size_t ws = WORKSPACE_BYTES;
    memset(&res, 0, sizeof res);
    TP_CHECK(types_of(c->dtype, &t));
    TP_CHECK(bind_stream(ctx, &slot));
    TP_CUBLAS(cublasLtMatmulDescCreate(&op, t.compute, t.scale), "cublasLtMatmulDescCreate");
    TP_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa), "cublasLt TRANSA");
    TP_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb), "cublasLt TRANSB");
    TP_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), "cublasLt EPILOGUE");
    TP_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias),
              "cublasLt BIAS_POINTER");
    /* column-major shapes as stored: cuBLAS' A is n x k (or k x n transposed), B is k x m (or m x k) */
    TP_CUBLAS(cublasLtMatrixLayoutCreate(&la, t.type, opa == CUBLAS_OP_N ? n : k, opa == CUBLAS_OP_N ? k : n, b->ld),
              "cublasLtMatrixLayoutCreate");
    TP_CUBLAS(cublasLtMatrixLayoutCreate(&lb, t.type, opb == CUBLAS_OP_N ? k : m, opb == CUBLAS_OP_N ? m : k, a->ld),
              "cublasLtMatrixLayoutCreate");
    TP_CUBLAS(cublasLtMatrixLayoutCreate(&lc, t.type, n, m, c->ld), "cublasLtMatrixLayoutCreate");
    TP_CUBLAS(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    TP_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
              "cublasLt MAX_WORKSPACE_BYTES");
    /* cuBLAS' A is our b, its B our a; C and D are c; the bias is read with D's alignment */
    align[0] = tp_gemm_alignment(b->data);
    align[1] = tp_gemm_alignment(a->data);
    align[2] = tp_gemm_alignment(c->data);
    align[3] = align[2] < tp_gemm_alignment(bias) ? align[2] : tp_gemm_alignment(bias);
    TP_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0],
                                                   sizeof align[0]), "cublasLt MIN_ALIGNMENT_A_BYTES");
    TP_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1],
                                                   sizeof align[1]), "cublasLt MIN_ALIGNMENT_B_BYTES");
    TP_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2],
                                                   sizeof align[2]), "cublasLt MIN_ALIGNMENT_C_BYTES");
    TP_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[3],
                                                   sizeof align[3]), "cublasLt MIN_ALIGNMENT_D_BYTES");
    if (cublasLtMatmulAlgoGetHeuristic(ctx->lt, op, la, lb, lc, lc, pref, 1, &res, &found) != CUBLAS_STATUS_SUCCESS ||
        found == 0) {
        st = tp_error(TP_ERR_UNSUPPORTED, "cuBLASLt has no bias-epilogue algorithm for %lldx%lldx%lld %s",
                      (long long)m, (long long)n, (long long)k, tp_dtype_name(c->dtype));
        goto out;
    }
    lst = cublasLtMatmul(ctx->lt, op, scal(&t, &sa, 1.0), b->data, la, a->data, lb, scal(&t, &sb, 0.0), c->data, lc,
                         c->data, lc, &res.algo, slot->mem, ws, tp_cuda_stream());
    if (lst != CUBLAS_STATUS_SUCCESS) { /* refused at launch: nothing was queued */
        st = tp_error(TP_ERR_UNSUPPORTED, "cublasLtMatmul refused the bias-epilogue GEMM %lldx%lldx%lld %s: %s",
                      (long long)m, (long long)n, (long long)k, tp_dtype_name(c->dtype), cublasGetStatusName(lst));
        goto out;
    }
    TP_CHECK(ws_used(slot));
    tp_log(TP_LOG_TRACE, "cuBLASLt bias GEMM %lldx%lldx%lld %s", (long long)m, (long long)n, (long long)k,
           tp_dtype_name(c->dtype));
out:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    return st;
}

static tp_status cu_gemm_bias(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, const void *bias)
{
    tp_status st = TP_OK;
    int prev = -1;
    cublas_ctx *ctx;
    int64_t k = ta ? a->rows : a->cols;
    TP_CHECK(check_mats(a, b, c));
    if (c->rows == 0 || c->cols == 0) goto out;
    TP_CHECK(ctx_get(c->device.index, &ctx, &prev));
    if (k > 0) {
        pthread_mutex_lock(&g_lock);
        st = lt_bias(ctx, a, ta, b, tb, c, bias);
        pthread_mutex_unlock(&g_lock);
        if (st != TP_ERR_UNSUPPORTED) goto out;
        tp_log(TP_LOG_INFO, "%s; bias added by a separate GEMM", tp_last_error());
        st = TP_OK;
    }
    /* fallback: rows = bias, then the accumulating GEMM */
    TP_CHECK(cu_rows(c, bias, 0));
    TP_CHECK(cu_gemm(a, ta, b, tb, c, 1));
out:
    tp_cuda_restore_device(prev);
    return st;
}

const tp_gemm_provider tp_gemm_cublas = {
    .name = "cuBLAS",
    .gemm = cu_gemm,
    .rows = cu_rows,
    .col_sums = cu_col_sums,
    .gemm_bias = cu_gemm_bias,
};
