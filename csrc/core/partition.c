/* The partition rule: DeepSpeed 0.19's tp_shard.get_shard_size_list (grains, heads) for every split
 * dimension, packed dimensions block by block, and the GQA rule that keeps query heads with their KV
 * group. Everything that cuts, gathers or describes a shard gets its ranges from here. */
#include <stdlib.h>
#include <string.h>

#include "error.h"

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

/* Rank r's size of a block of n elements: `units` equal head units (0: none), else DeepSpeed's grains. */
static int64_t rank_size(int64_t n, int p, int r, int64_t units, int64_t grain)
{
    if (units > 0) return dealt(units, p, r) * (n / units);
    if (n >= grain) return dealt(n / grain, p, r) * grain + (r == p - 1 ? n % grain : 0);
    return dealt(n, p, r);
}

static tp_status check_spec(const tp_split_spec *spec, int p)
{
    tp_status st = TP_OK;
    TP_REQUIRE(spec != NULL, "partition: spec is NULL");
    TP_REQUIRE(p >= 1, "partition: group size must be >= 1, got %d", p);
    TP_REQUIRE(spec->grain >= 1, "partition: tp_grain_size must be >= 1, got %lld", (long long)spec->grain);
    TP_REQUIRE(spec->kv_heads >= 0 && spec->num_heads >= 0 && spec->num_kv_heads >= 0 && spec->head_dim >= 0,
               "partition: head counts and head_dim must be >= 0, got kv_heads=%lld num_heads=%lld "
               "num_kv_heads=%lld head_dim=%lld",
               (long long)spec->kv_heads, (long long)spec->num_heads, (long long)spec->num_kv_heads,
               (long long)spec->head_dim);
    if (spec->num_heads > 0 && spec->num_kv_heads > 0)
        TP_REQUIRE(spec->num_heads % spec->num_kv_heads == 0,
                   "num_heads=%lld is not a multiple of num_kv_heads=%lld: query heads cannot follow their KV "
                   "group", (long long)spec->num_heads, (long long)spec->num_kv_heads);
out:
    return st;
}

/* The layer's own split unit: its KV groups (num_kv_heads, else num_heads), 0 when it has no heads. */
static int64_t layer_units(const tp_split_spec *spec)
{
    return spec->num_kv_heads > 0 ? spec->num_kv_heads : spec->num_heads;
}

/* The head units of one block of n elements. per_block: the packed blocks' own heads are known (heads
 * of this one, 0: a block without heads), split as `groups` KV groups. Otherwise the layer's KV groups,
 * else kv_heads where DeepSpeed would use it. Fails when given heads do not tile the block. */
static tp_status block_units(int64_t n, int per_block, int64_t heads, int64_t groups, const tp_split_spec *spec,
                             int64_t *units)
{
    tp_status st = TP_OK;
    int64_t lu = layer_units(spec);
    *units = 0;
    if (per_block) {
        if (heads == 0) goto out;
        TP_REQUIRE(heads % groups == 0,
                   "%lld heads cannot follow their KV group: not a multiple of the %lld KV heads",
                   (long long)heads, (long long)groups);
        TP_REQUIRE(n % heads == 0, "%lld heads do not tile a block of %lld", (long long)heads, (long long)n);
        *units = groups;
    } else if (lu > 0) {
        int64_t hd = spec->head_dim;
        if (hd > 0)
            TP_REQUIRE(n == lu * hd || (spec->num_heads > 0 && n == spec->num_heads * hd),
                       "dimension %lld is neither num_heads*head_dim (%lld) nor num_kv_heads*head_dim (%lld)",
                       (long long)n, (long long)(spec->num_heads * hd), (long long)(lu * hd));
        TP_REQUIRE(n % lu == 0, "dimension %lld is not made of %lld %s", (long long)n, (long long)lu,
                   spec->num_kv_heads > 0 ? "KV groups (num_kv_heads)" : "heads (num_heads)");
        *units = lu;
    } else if (spec->kv_heads > 0 && n % spec->kv_heads == 0 && name_allows_heads(spec->name)) {
        *units = spec->kv_heads;
    }
out:
    return st;
}

tp_status tp_partition_packed(const int64_t *block_sizes, int nblocks, int p, const tp_split_spec *spec,
                              const int64_t *block_heads, tp_range *out)
{
    tp_status st = TP_OK;
    int64_t base = 0, groups = 0;
    int64_t *heads = NULL;
    int per_block;
    TP_REQUIRE(out != NULL, "partition: output is NULL");
    TP_REQUIRE(block_sizes != NULL && nblocks >= 1, "partition: need at least one block");
    TP_CHECK(check_spec(spec, p));
    per_block = block_heads != NULL || (nblocks > 1 && spec->head_dim > 0 && layer_units(spec) > 0);
    heads = calloc((size_t)nblocks, sizeof *heads);
    if (heads == NULL) {
        st = tp_error(TP_ERR_NOMEM, "partition: out of memory");
        goto out;
    }
    for (int i = 0; i < nblocks; i++) {
        TP_REQUIRE(block_sizes[i] >= 0, "partition: block %d has size %lld", i, (long long)block_sizes[i]);
        if (block_heads != NULL) {
            TP_REQUIRE(block_heads[i] >= 0, "partition: block %d has %lld heads", i, (long long)block_heads[i]);
            heads[i] = block_heads[i];
        } else if (per_block) {
            TP_REQUIRE(block_sizes[i] % spec->head_dim == 0, "block %d of size %lld is not made of heads of "
                       "head_dim=%lld", i, (long long)block_sizes[i], (long long)spec->head_dim);
            heads[i] = block_sizes[i] / spec->head_dim;
        }
        if (heads[i] > 0 && (groups == 0 || heads[i] < groups)) groups = heads[i];
    }
    if (groups > 0 && layer_units(spec) > 0)
        TP_REQUIRE(groups == layer_units(spec),
                   "the packed blocks have %lld KV heads (the fewest heads of a block) but the layer has %lld",
                   (long long)groups, (long long)layer_units(spec));
    for (int i = 0; i < nblocks; i++) {
        int64_t units, off = base;
        st = block_units(block_sizes[i], per_block, heads[i], groups, spec, &units);
        if (st != TP_OK) {
            if (nblocks > 1)
                st = tp_error_context(st, "block %d of %d (size %lld)", i, nblocks, (long long)block_sizes[i]);
            goto out;
        }
        for (int r = 0; r < p; r++) {
            tp_range *o = &out[(size_t)r * (size_t)nblocks + (size_t)i];
            o->offset = off;
            o->size = rank_size(block_sizes[i], p, r, units, spec->grain);
            off += o->size;
        }
        base += block_sizes[i];
    }
out:
    free(heads);
    return st;
}

tp_status tp_partition(int64_t n, int p, const tp_split_spec *spec, tp_range *out)
{
    return tp_partition_packed(&n, 1, p, spec, NULL, out);
}

tp_status tp_attention_heads(int64_t num_heads, int64_t num_kv_heads, int p, tp_range *q, tp_range *kv)
{
    tp_status st = TP_OK;
    int64_t group, qoff = 0, kvoff = 0;
    TP_REQUIRE(q != NULL && kv != NULL, "attention heads: output is NULL");
    TP_REQUIRE(p >= 1, "attention heads: group size must be >= 1, got %d", p);
    TP_REQUIRE(num_heads >= 1, "attention heads: num_heads must be >= 1, got %lld", (long long)num_heads);
    TP_REQUIRE(num_kv_heads >= 0, "attention heads: num_kv_heads must be >= 0, got %lld", (long long)num_kv_heads);
    if (num_kv_heads == 0) num_kv_heads = num_heads;
    TP_REQUIRE(num_heads % num_kv_heads == 0,
               "num_heads=%lld is not a multiple of num_kv_heads=%lld: query heads cannot follow their KV group",
               (long long)num_heads, (long long)num_kv_heads);
    group = num_heads / num_kv_heads;
    for (int r = 0; r < p; r++) {
        int64_t k = dealt(num_kv_heads, p, r);
        kv[r].offset = kvoff;
        kv[r].size = k;
        q[r].offset = qoff;
        q[r].size = k * group;
        kvoff += k;
        qoff += k * group;
    }
out:
    return st;
}
