/* Partition math against hand-computed tables (even, uneven grain, uneven heads, small, packed). */
#include <string.h>

#include "check.h"

static void expect_table(int64_t n, int p, tp_split_mode mode, int64_t heads, const char *name,
                         const int64_t *sizes)
{
    tp_range r[8];
    int64_t off = 0;
    EXPECT_OK(tp_partition(n, p, mode, heads, name, r));
    for (int i = 0; i < p; i++) {
        if (r[i].size != sizes[i] || r[i].offset != off) {
            fprintf(stderr, "n=%lld p=%d mode=%d heads=%lld name=%s: rank %d got (%lld, %lld), want (%lld, %lld)\n",
                    (long long)n, p, (int)mode, (long long)heads, name ? name : "-", i, (long long)r[i].offset,
                    (long long)r[i].size, (long long)off, (long long)sizes[i]);
            tp_test_failures++;
        }
        off += sizes[i];
    }
}

int main(void)
{
    tp_range r[8];
    /* training: torch.chunk of a divisible dim */
    expect_table(12, 3, TP_SPLIT_EVEN, 0, NULL, (int64_t[]){4, 4, 4});
    expect_table(4096, 4, TP_SPLIT_EVEN, 0, NULL, (int64_t[]){1024, 1024, 1024, 1024});
    expect_table(7, 1, TP_SPLIT_EVEN, 0, NULL, (int64_t[]){7});
    EXPECT_STATUS(tp_partition(10, 3, TP_SPLIT_EVEN, 0, NULL, r), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "10") != NULL && strstr(tp_last_error(), "3") != NULL);
    /* inference, grains of 64: 4096 = 64 grains over 3 -> 22, 21, 21 grains */
    expect_table(4096, 3, TP_SPLIT_UNEVEN, 0, NULL, (int64_t[]){1408, 1344, 1344});
    /* the n % 64 tail goes to the last rank (DeepSpeed would drop it) */
    expect_table(4100, 3, TP_SPLIT_UNEVEN, 0, NULL, (int64_t[]){1408, 1344, 1348});
    expect_table(100, 3, TP_SPLIT_UNEVEN, 0, NULL, (int64_t[]){64, 0, 36});
    /* n < 64: single elements, the first n % p ranks get one more */
    expect_table(50, 4, TP_SPLIT_UNEVEN, 0, NULL, (int64_t[]){13, 13, 12, 12});
    expect_table(2, 3, TP_SPLIT_UNEVEN, 0, NULL, (int64_t[]){1, 1, 0});
    /* heads: 32 heads of 128 over 3 -> 11, 11, 10 heads */
    expect_table(4096, 3, TP_SPLIT_UNEVEN, 32, "self_attn.q_proj", (int64_t[]){1408, 1408, 1280});
    expect_table(4096, 3, TP_SPLIT_UNEVEN, 32, NULL, (int64_t[]){1408, 1408, 1280});
    /* MLP and output layers never use the head rule */
    expect_table(4096, 3, TP_SPLIT_UNEVEN, 32, "model.mlp.down_proj", (int64_t[]){1408, 1344, 1344});
    expect_table(4096, 3, TP_SPLIT_UNEVEN, 32, "lm_head", (int64_t[]){1408, 1344, 1344});
    /* heads that do not divide n fall back to grains */
    expect_table(4096, 3, TP_SPLIT_UNEVEN, 3, NULL, (int64_t[]){1408, 1344, 1344});
    /* bad arguments */
    EXPECT_STATUS(tp_partition(8, 0, TP_SPLIT_EVEN, 0, NULL, r), TP_ERR_VALUE);
    EXPECT_STATUS(tp_partition(-1, 2, TP_SPLIT_EVEN, 0, NULL, r), TP_ERR_VALUE);
    {
        /* packed fused QKV, training: q 192, k 64, v 64 over 2 */
        int64_t blocks[3] = {192, 64, 64};
        tp_range pk[6];
        const int64_t want[6][2] = {{0, 96}, {192, 32}, {256, 32}, {96, 96}, {224, 32}, {288, 32}};
        EXPECT_OK(tp_partition_packed(blocks, 3, 2, TP_SPLIT_EVEN, NULL, NULL, pk));
        for (int i = 0; i < 6; i++) EXPECT(pk[i].offset == want[i][0] && pk[i].size == want[i][1]);
    }
    {
        /* packed grouped-query attention, inference: q 8 heads x 16, k and v 2 heads x 16, over 3 */
        int64_t blocks[3] = {128, 32, 32}, heads[3] = {8, 2, 2};
        tp_range pk[9];
        const int64_t want[9][2] = {{0, 48}, {128, 16}, {160, 16},  {48, 48}, {144, 16},
                                    {176, 16}, {96, 32}, {160, 0}, {192, 0}};
        EXPECT_OK(tp_partition_packed(blocks, 3, 3, TP_SPLIT_UNEVEN, heads, NULL, pk));
        for (int i = 0; i < 9; i++) {
            if (pk[i].size != want[i][1] || (want[i][1] > 0 && pk[i].offset != want[i][0])) {
                fprintf(stderr, "GQA piece %d: got (%lld, %lld), want (%lld, %lld)\n", i, (long long)pk[i].offset,
                        (long long)pk[i].size, (long long)want[i][0], (long long)want[i][1]);
                tp_test_failures++;
            }
        }
    }
    {
        /* gate/up with an odd block: training must refuse and name the block */
        int64_t blocks[2] = {6, 5};
        tp_range pk[4];
        EXPECT_STATUS(tp_partition_packed(blocks, 2, 2, TP_SPLIT_EVEN, NULL, NULL, pk), TP_ERR_VALUE);
        EXPECT(strstr(tp_last_error(), "block 1") != NULL);
    }
    TEST_MAIN_END();
}
