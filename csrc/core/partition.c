/* Partition math: training (even, torch.chunk) and inference (DeepSpeed's shard-size rule) splits. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* DeepSpeed's get_shard_size never applies the head rule to MLP, MoE-MLP or output layers. */
static int name_allows_heads(const char *name)
{
    static const char *const no_heads[] = {"mlp", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"};
    if (name == NULL) return 1;
    if (strcmp(name, "lm_head") == 0 || strcmp(name, "embed_out") == 0) return 0;
    for (size_t i = 0; i < sizeof no_heads / sizeof no_heads[0]; i++)
        if (strstr(name, no_heads[i]) != NULL) return 0;
    return 1;
}

/* units dealt over p ranks, the first units % p ranks getting one more. */
static int64_t dealt(int64_t units, int p, int r) { return units / p + (r < units % p ? 1 : 0); }

tp_status tp_partition(int64_t n, int p, tp_split_mode mode, int64_t num_heads, const char *name,
                       tp_range *out)
{
    tp_status st = TP_OK;
    int64_t off = 0;
    TP_REQUIRE(out != NULL, "partition: output is NULL");
    TP_REQUIRE(p >= 1, "partition: group size must be >= 1, got %d", p);
    TP_REQUIRE(n >= 0, "partition: dimension must be >= 0, got %lld", (long long)n);
    TP_REQUIRE(num_heads >= 0, "partition: head count must be >= 0, got %lld", (long long)num_heads);
    if (mode == TP_SPLIT_EVEN) {
        TP_REQUIRE(n % p == 0,
                   "training mode splits evenly: dimension %lld is not divisible by the group size %d",
                   (long long)n, p);
        for (int r = 0; r < p; r++) {
            out[r].offset = r * (n / p);
            out[r].size = n / p;
        }
        goto out;
    }
    TP_REQUIRE(mode == TP_SPLIT_UNEVEN, "partition: unknown split mode %d", (int)mode);
    for (int r = 0; r < p; r++) {
        int64_t size;
        if (num_heads > 0 && n % num_heads == 0 && name_allows_heads(name))
            size = dealt(num_heads, p, r) * (n / num_heads);
        else if (n >= 64)
            size = dealt(n / 64, p, r) * 64 + (r == p - 1 ? n % 64 : 0);
        else
            size = dealt(n, p, r);
        out[r].offset = off;
        out[r].size = size;
        off += size;
    }
out:
    return st;
}

tp_status tp_partition_packed(const int64_t *block_sizes, int nblocks, int p, tp_split_mode mode,
                              const int64_t *block_heads, const char *name, tp_range *out)
{
    tp_status st = TP_OK;
    tp_range *tmp = NULL;
    int64_t base = 0;
    TP_REQUIRE(block_sizes != NULL && nblocks >= 1, "packed partition: need at least one block");
    TP_REQUIRE(p >= 1, "packed partition: group size must be >= 1, got %d", p);
    tmp = malloc((size_t)p * sizeof *tmp);
    if (tmp == NULL) {
        st = tp_error(TP_ERR_NOMEM, "packed partition: out of memory");
        goto out;
    }
    for (int i = 0; i < nblocks; i++) {
        st = tp_partition(block_sizes[i], p, mode, block_heads ? block_heads[i] : 0, name, tmp);
        if (st != TP_OK) {
            st = tp_error_context(st, "block %d of %d (size %lld)", i, nblocks, (long long)block_sizes[i]);
            goto out;
        }
        for (int r = 0; r < p; r++) {
            out[r * nblocks + i].offset = base + tmp[r].offset;
            out[r * nblocks + i].size = tmp[r].size;
        }
        base += block_sizes[i];
    }
out:
    free(tmp);
    return st;
}
