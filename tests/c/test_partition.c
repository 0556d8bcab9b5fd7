/* The partition rule against tables from DeepSpeed 0.19's tp_shard.get_shard_size_list (training grain 1,
 * inference grain 64, heads), the GQA rule, packed blocks, and bad arguments. The exhaustive comparison
 * with DeepSpeed's rule (n = 1..300, p = 1..8) is tests/test_partition.py. */
#include <string.h>

#include "check.h"

static void expect_sizes(const char *what, int64_t n, int p, const tp_split_spec *spec, const int64_t *sizes)
{
    tp_range r[8];
    int64_t off = 0;
    tp_status st = tp_partition(n, p, spec, r);
    if (st != TP_OK) {
        fprintf(stderr, "%s: n=%lld p=%d failed: %s\n", what, (long long)n, p, tp_last_error());
        tp_test_failures++;
        return;
    }
    for (int i = 0; i < p; i++) {
        if (r[i].size != sizes[i] || r[i].offset != off) {
            fprintf(stderr, "%s: n=%lld p=%d: rank %d got (%lld, %lld), want (%lld, %lld)\n", what, (long long)n, p,
                    i, (long long)r[i].offset, (long long)r[i].size, (long long)off, (long long)sizes[i]);
            tp_test_failures++;
        }
        off += sizes[i];
    }
}

#define GRAIN(g) (&(tp_split_spec){.grain = (g)})
#define KV(g, h, nm) (&(tp_split_spec){.grain = (g), .kv_heads = (h), .name = (nm)})
#define HEADS(g, nh, nkv, hd) (&(tp_split_spec){.grain = (g), .num_heads = (nh), .num_kv_heads = (nkv), .head_dim = (hd)})

static void expect_packed(const char *what, const int64_t *blocks, int nblocks, int p, const tp_split_spec *spec,
                          const int64_t *heads, const int64_t *sizes /* [p][nblocks] */)
{
    tp_range r[32];
    if (tp_partition_packed(blocks, nblocks, p, spec, heads, r) != TP_OK) {
        fprintf(stderr, "%s failed: %s\n", what, tp_last_error());
        tp_test_failures++;
        return;
    }
    for (int i = 0; i < nblocks; i++) {
        int64_t off = 0;
        for (int b = 0; b < i; b++) off += blocks[b];
        for (int q = 0; q < p; q++) {
            const tp_range *got = &r[q * nblocks + i];
            if (got->size != sizes[q * nblocks + i] || got->offset != off) {
                fprintf(stderr, "%s: rank %d block %d got (%lld, %lld), want (%lld, %lld)\n", what, q, i,
                        (long long)got->offset, (long long)got->size, (long long)off,
                        (long long)sizes[q * nblocks + i]);
                tp_test_failures++;
            }
            off += got->size;
        }
    }
}

int main(void)
{
    tp_range r[8], q[8], kv[8];
    /* training (grain 1): DeepSpeed 0.19 splits what the group does not divide */
    expect_sizes("training 130/3", 130, 3, GRAIN(TP_GRAIN_TRAINING), (int64_t[]){44, 43, 43});
    expect_sizes("training 129/4", 129, 4, GRAIN(TP_GRAIN_TRAINING), (int64_t[]){33, 32, 32, 32});
    expect_sizes("training 12/3", 12, 3, GRAIN(TP_GRAIN_TRAINING), (int64_t[]){4, 4, 4});
    expect_sizes("training lm_head 101/2", 101, 2, KV(1, 0, "lm_head"), (int64_t[]){51, 50});
    expect_sizes("training 2/3", 2, 3, GRAIN(1), (int64_t[]){1, 1, 0});
    /* the head rule applies in training too: q_proj 768, 4 KV heads, 3 ranks */
    expect_sizes("training q_proj kv=4", 768, 3, KV(1, 4, "self_attn.q_proj"), (int64_t[]){384, 192, 192});
    expect_sizes("training q_proj layer heads", 768, 3, HEADS(1, 12, 4, 64), (int64_t[]){384, 192, 192});
    expect_sizes("training k_proj layer heads", 256, 3, HEADS(1, 12, 4, 64), (int64_t[]){128, 64, 64});
    /* inference (grain 64): 4096 = 64 grains over 3 -> 22, 21, 21 grains; the n % 64 tail to the last rank */
    expect_sizes("inference 4096/3", 4096, 3, GRAIN(64), (int64_t[]){1408, 1344, 1344});
    expect_sizes("inference 4100/3", 4100, 3, GRAIN(64), (int64_t[]){1408, 1344, 1348});
    expect_sizes("inference 100/3", 100, 3, GRAIN(64), (int64_t[]){64, 0, 36});
    expect_sizes("inference 50/4", 50, 4, GRAIN(64), (int64_t[]){13, 13, 12, 12});
    /* a grain of 8 */
    expect_sizes("grain 8", 100, 3, GRAIN(8), (int64_t[]){32, 32, 36});
    /* DeepSpeed's kv_heads: 32 heads of 128 over 3 -> 11, 11, 10 heads; skipped by MLP / output names and
     * where it does not divide */
    expect_sizes("kv 32 q_proj", 4096, 3, KV(64, 32, "self_attn.q_proj"), (int64_t[]){1408, 1408, 1280});
    expect_sizes("kv 32 no name", 4096, 3, KV(64, 32, NULL), (int64_t[]){1408, 1408, 1280});
    expect_sizes("kv 32 mlp", 4096, 3, KV(64, 32, "model.mlp.down_proj"), (int64_t[]){1408, 1344, 1344});
    expect_sizes("kv 32 lm_head", 4096, 3, KV(64, 32, "lm_head"), (int64_t[]){1408, 1344, 1344});
    expect_sizes("kv 3 does not divide", 4096, 3, KV(64, 3, NULL), (int64_t[]){1408, 1344, 1344});
    /* the layer's own heads apply whatever the name, and must tile the dimension */
    expect_sizes("layer heads, mlp name", 4096, 3,
                 &(tp_split_spec){.grain = 64, .name = "mlp.attn", .num_heads = 32}, (int64_t[]){1408, 1408, 1280});
    EXPECT_STATUS(tp_partition(4096, 3, HEADS(64, 3, 0, 0), r), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "4096") != NULL && strstr(tp_last_error(), "3") != NULL);
    EXPECT_STATUS(tp_partition(700, 3, HEADS(1, 12, 4, 64), r), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "head_dim") != NULL);
    EXPECT_STATUS(tp_partition(768, 3, HEADS(1, 12, 5, 0), r), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "KV group") != NULL);
    /* the GQA rule: KV heads dealt whole, query heads follow their group */
    EXPECT_OK(tp_attention_heads(12, 4, 3, q, kv));
    EXPECT(kv[0].offset == 0 && kv[0].size == 2 && kv[1].offset == 2 && kv[1].size == 1 && kv[2].offset == 3 &&
           kv[2].size == 1);
    EXPECT(q[0].offset == 0 && q[0].size == 6 && q[1].offset == 6 && q[1].size == 3 && q[2].offset == 9 &&
           q[2].size == 3);
    EXPECT_OK(tp_attention_heads(8, 0, 3, q, kv)); /* multi-head: 3, 3, 2 */
    EXPECT(q[2].offset == 6 && q[2].size == 2 && kv[2].offset == 6 && kv[2].size == 2);
    EXPECT_OK(tp_attention_heads(8, 2, 4, q, kv)); /* fewer KV heads than ranks: two ranks hold none */
    EXPECT(q[0].size == 4 && q[1].size == 4 && q[2].size == 0 && q[3].size == 0 && kv[3].size == 0);
    EXPECT_STATUS(tp_attention_heads(10, 4, 2, q, kv), TP_ERR_VALUE);
    EXPECT_STATUS(tp_attention_heads(0, 0, 2, q, kv), TP_ERR_VALUE);
    /* bad arguments */
    EXPECT_STATUS(tp_partition(8, 0, GRAIN(1), r), TP_ERR_VALUE);
    EXPECT_STATUS(tp_partition(-1, 2, GRAIN(1), r), TP_ERR_VALUE);
    EXPECT_STATUS(tp_partition(8, 2, GRAIN(0), r), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "tp_grain_size") != NULL);
    EXPECT_STATUS(tp_partition(8, 2, NULL, r), TP_ERR_VALUE);
    {
        /* packed fused QKV, training: q 192, k 64, v 64 over 2 */
        int64_t blocks[3] = {192, 64, 64};
        expect_packed("qkv training", blocks, 3, 2, GRAIN(1), NULL, (int64_t[]){96, 32, 32, 96, 32, 32});
        /* odd blocks split too in training (grain 1) */
        expect_packed("gate/up 6+5", (int64_t[]){6, 5}, 2, 2, GRAIN(1), NULL, (int64_t[]){3, 3, 3, 2});
    }
    {
        /* GQA packed: q 8 heads x 16, k and v 2 heads x 16, over 3: the 2 KV groups are dealt 1/1/0 and the
         * query heads follow (4/4/0), where splitting the 8 query heads alone would give 3/3/2 */
        int64_t blocks[3] = {128, 32, 32}, heads[3] = {8, 2, 2};
        expect_packed("gqa 8/2 p3", blocks, 3, 3, GRAIN(64), heads, (int64_t[]){64, 16, 16, 64, 16, 16, 0, 0, 0});
        /* the same from the layer's heads: block_heads derived from head_dim, or the KV groups alone */
        expect_packed("gqa layer heads+head_dim", blocks, 3, 3, HEADS(64, 8, 2, 16), NULL,
                      (int64_t[]){64, 16, 16, 64, 16, 16, 0, 0, 0});
        expect_packed("gqa layer heads", blocks, 3, 3, HEADS(1, 8, 2, 0), NULL,
                      (int64_t[]){64, 16, 16, 64, 16, 16, 0, 0, 0});
    }
    {
        /* the case: 10 query heads, 5 KV heads of 4 at 3 ranks: KV 2/2/1, Q 4/4/2 */
        int64_t blocks[3] = {40, 20, 20}, heads[3] = {10, 5, 5};
        expect_packed("gqa 10/5 p3", blocks, 3, 3, GRAIN(64), heads, (int64_t[]){16, 8, 8, 16, 8, 8, 8, 4, 4});
        /* DeepSpeed's model-wide kv_heads on each block gives the same */
        expect_packed("kv_heads 5 on qkv blocks", blocks, 3, 3, KV(64, 5, "qkv_proj"), NULL,
                      (int64_t[]){16, 8, 8, 16, 8, 8, 8, 4, 4});
    }
    {
        /* heads that cannot follow their KV group: 10 query heads over 4 KV heads */
        int64_t blocks[3] = {40, 16, 16}, heads[3] = {10, 4, 4};
        tp_range pk[9];
        EXPECT_STATUS(tp_partition_packed(blocks, 3, 3, GRAIN(1), heads, pk), TP_ERR_VALUE);
        EXPECT(strstr(tp_last_error(), "block 0") != NULL && strstr(tp_last_error(), "KV") != NULL);
        /* block heads that disagree with the layer's KV heads */
        EXPECT_STATUS(tp_partition_packed(blocks, 3, 3, HEADS(1, 12, 2, 0), (int64_t[]){12, 4, 4}, pk),
                      TP_ERR_VALUE);
        /* heads that do not tile their block */
        EXPECT_STATUS(tp_partition_packed((int64_t[]){30, 8}, 2, 2, GRAIN(1), (int64_t[]){4, 4}, pk), TP_ERR_VALUE);
        EXPECT(strstr(tp_last_error(), "block 0") != NULL);
    }
    TEST_MAIN_END();
}
