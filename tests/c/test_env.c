/* The environment and the backend registry of a CPU-only build: the knob table (read once per process:
 * the knob worlds run first, in children forked before this process reads any knob), tp_world_from_env
 * (torchrun's and OpenMPI's variables, malformed values), the versioned tp_init_options, and what
 * init says for registered, known-but-missing and unknown backend names. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "world.h"

/* A world of 2 whose shm segment setup must refuse TPLINEAR_SHM_SLOT_KB=abc on both ranks. */
static int bad_slot_knob(int rank, int size, int port)
{
    tp_group *g = NULL;
    EXPECT_STATUS(world_init(rank, size, port, 10.0, &g), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "TPLINEAR_SHM_SLOT_KB") != NULL && strstr(tp_last_error(), "'abc'") != NULL);
    EXPECT(g == NULL);
    return tp_test_failures;
}

/* TPLINEAR_BACKEND=shm picks shm for a world that asks for none; TPLINEAR_SHM_SLOT_KB=16 is taken. */
static int backend_knob(int rank, int size, int port)
{
    tp_group *g = NULL;
    tp_init_options o = TP_INIT_OPTIONS_INITIALIZER;
    void *stage = NULL;
    o.rank = rank;
    o.world_size = size;
    o.master_addr = "127.0.0.1";
    o.master_port = port;
    o.timeout_s = 10.0;
    EXPECT_OK(tp_group_init_world(&o, &g));
    if (g == NULL) return 1;
    EXPECT(strcmp(tp_group_backend(g), "shm") == 0);
    /* 16 KiB slots: 8 KiB of staging, so 8 KiB fits and 8 KiB + 1 does not */
    EXPECT_OK(tp_all_reduce_staging(g, 8192, &stage));
    EXPECT(stage != NULL);
    EXPECT_OK(tp_all_reduce_staging(g, 8193, &stage));
    EXPECT(stage == NULL);
    tp_group_destroy(g);
    return tp_test_failures;
}

static void knob_worlds(void)
{
    setenv("TPLINEAR_SHM_SLOT_KB", "abc", 1);
    EXPECT(run_world(2, bad_slot_knob, -1) == 0);
    setenv("TPLINEAR_SHM_SLOT_KB", "16", 1);
    setenv("TPLINEAR_BACKEND", "shm", 1);
    EXPECT(run_world(2, backend_knob, -1) == 0);
    unsetenv("TPLINEAR_SHM_SLOT_KB");
    unsetenv("TPLINEAR_BACKEND");
}

static void knob_table(void)
{
    int n = tp_env_knob_count(), found = 0;
    tp_env_knob k;
    EXPECT(n >= 10);
    for (int i = 0; i < n; i++) {
        EXPECT_OK(tp_env_knob_at(i, &k));
        EXPECT(k.name && strncmp(k.name, "TPLINEAR_", 9) == 0 && k.type && k.default_value && k.doc && k.doc[0]);
        EXPECT((strcmp(k.type, "choice") == 0) == (k.choices != NULL));
        if (strcmp(k.name, "TPLINEAR_SHM_SLOT_KB") == 0) found = strcmp(k.default_value, "8192") == 0;
    }
    EXPECT(found);
    EXPECT_STATUS(tp_env_knob_at(n, &k), TP_ERR_VALUE);
    EXPECT_STATUS(tp_env_knob_at(-1, &k), TP_ERR_VALUE);
}

static void clear_world_env(void)
{
    static const char *const vars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                       "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
}

static void world_env(void)
{
    tp_world_env w;
    clear_world_env();
    EXPECT_OK(tp_world_from_env(&w));
    EXPECT(w.rank == -1 && w.world_size == -1 && w.local_rank == -1 && w.local_world_size == -1 &&
           w.master_port == -1 && w.master_addr[0] == '\0');
    /* torchrun's */
    setenv("RANK", "3", 1);
    setenv("WORLD_SIZE", "4", 1);
    setenv("LOCAL_RANK", "1", 1);
    setenv("LOCAL_WORLD_SIZE", "2", 1);
    setenv("MASTER_ADDR", "node7", 1);
    setenv("MASTER_PORT", "29999", 1);
    EXPECT_OK(tp_world_from_env(&w));
    EXPECT(w.rank == 3 && w.world_size == 4 && w.local_rank == 1 && w.local_world_size == 2 && w.master_port == 29999 &&
           strcmp(w.master_addr, "node7") == 0);
    /* OpenMPI's, when torchrun's are missing; torchrun's win when both are set */
    clear_world_env();
    setenv("OMPI_COMM_WORLD_RANK", "2", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "3", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1", 1);
    EXPECT_OK(tp_world_from_env(&w));
    EXPECT(w.rank == 2 && w.world_size == 3 && w.local_rank == 0 && w.local_world_size == 1);
    setenv("RANK", "1", 1);
    EXPECT_OK(tp_world_from_env(&w));
    EXPECT(w.rank == 1);
    /* malformed: named */
    setenv("OMPI_COMM_WORLD_SIZE", "three", 1);
    EXPECT_STATUS(tp_world_from_env(&w), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "OMPI_COMM_WORLD_SIZE") != NULL && strstr(tp_last_error(), "three") != NULL);
    setenv("OMPI_COMM_WORLD_SIZE", "3", 1);
    setenv("MASTER_PORT", "-5", 1);
    EXPECT_STATUS(tp_world_from_env(&w), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "MASTER_PORT") != NULL);
    clear_world_env();
}

static void init_options(void)
{
    tp_init_options o, d = TP_INIT_OPTIONS_INITIALIZER;
    tp_group *g = NULL;
    tp_init_options_default(&o);
    EXPECT(o.size == sizeof(tp_init_options) && o.magic == d.magic && o.version == TP_INIT_OPTIONS_VERSION && o.rank == -1 &&
           o.backend == NULL && o.timeout_s == 300.0 && o.device == TP_DEVICE_CPU);
    /* a world of one from the (cleared) environment */
    EXPECT_OK(tp_group_init_world(&o, &g));
    EXPECT(g != NULL && tp_group_size(g) == 1 && strcmp(tp_group_backend(g), "self") == 0);
    tp_group_destroy(g);
    g = NULL;
    /* a struct nobody initialised, one of another size, one of a later version: refused, not misread */
    memset(&o, 0, sizeof o);
    EXPECT_STATUS(tp_group_init_world(&o, &g), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "TP_INIT_OPTIONS_INITIALIZER") != NULL && g == NULL);
    tp_init_options_default(&o);
    o.size -= sizeof(int);
    EXPECT_STATUS(tp_group_init_world(&o, &g), TP_ERR_VALUE);
    tp_init_options_default(&o);
    o.version = TP_INIT_OPTIONS_VERSION + 1;
    EXPECT_STATUS(tp_group_init_world(&o, &g), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "version") != NULL);
    EXPECT_STATUS(tp_group_init_world(NULL, &g), TP_ERR_VALUE);
}

static tp_status init_named(const char *backend, tp_device_type device, tp_group **g)
{
    tp_init_options o = TP_INIT_OPTIONS_INITIALIZER;
    o.backend = backend;
    o.device = device;
    o.rank = 0;
    o.world_size = 1;
    return tp_group_init_world(&o, g);
}

static void registry(void)
{
    tp_group *g = NULL;
    int shm = 0;
    for (int i = 0; i < tp_backend_count(); i++) {
        EXPECT(tp_backend_name(i) != NULL);
        if (strcmp(tp_backend_name(i), "shm") == 0) shm = 1;
        EXPECT(strcmp(tp_backend_name(i), "nccl") != 0); /* a CPU build registers no nccl */
        EXPECT(strcmp(tp_backend_name(i), "mpi") != 0);  /* the C tests' library is built without MPI */
    }
    EXPECT(shm && tp_backend_name(tp_backend_count()) == NULL && tp_backend_name(-1) == NULL);
    EXPECT_OK(init_named("shm", TP_DEVICE_CPU, &g));
    EXPECT(strcmp(tp_group_backend(g), "self") == 0); /* shm leaves groups of one to the generic one */
    tp_group_destroy(g);
    EXPECT_OK(init_named("auto", TP_DEVICE_CPU, &g));
    tp_group_destroy(g);
    g = NULL;
    EXPECT_STATUS(init_named("mpi", TP_DEVICE_CPU, &g), TP_ERR_UNSUPPORTED);
    EXPECT(strstr(tp_last_error(), "'mpi'") != NULL && strstr(tp_last_error(), "not built") != NULL &&
           strstr(tp_last_error(), "apt-get install libopenmpi-dev") != NULL);
    EXPECT_STATUS(init_named("nccl", TP_DEVICE_CPU, &g), TP_ERR_UNSUPPORTED);
    EXPECT(strstr(tp_last_error(), "built without CUDA") != NULL);
    EXPECT_STATUS(init_named("gloo", TP_DEVICE_CPU, &g), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "'shm'") != NULL && strstr(tp_last_error(), "'gloo'") != NULL);
    /* an automatic choice for GPU memory in a CPU build */
    EXPECT_STATUS(init_named(NULL, TP_DEVICE_CUDA, &g), TP_ERR_UNSUPPORTED);
    EXPECT(strstr(tp_last_error(), "GPU memory") != NULL && strstr(tp_last_error(), "built without CUDA") != NULL);
    EXPECT(g == NULL);
    /* shm on two hosts: the hosts are compared at rendezvous, so it takes several processes
     * (tests/test_launch_anywhere.py: test_shm_refuses_a_world_that_spans_hosts) */
}

int main(void)
{
    knob_worlds(); /* first: this process must not have read the knobs before it forks them */
    knob_table();
    world_env();
    init_options();
    registry();
    TEST_MAIN_END();
}
