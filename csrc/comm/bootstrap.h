/* Rendezvous (comm/bootstrap.c): what making a group asks of the launcher and the store. comm/group.c makes
 * the group object around these. Internal. */
#ifndef TP_COMM_BOOTSTRAP_H
#define TP_COMM_BOOTSTRAP_H

#include "registry.h"

/* The world's shape: each field from opts when given, else from the launcher's environment, else a world
 * of one (local rank and size: -1 when neither says). */
tp_status tp_boot_world_shape(const tp_init_options *opts, int *size, int *rank, int *lrank, int *lsize);
/* The rendezvous store of world g (rank, size and timeout set; more than one rank): sets g->store. */
tp_status tp_boot_open_store(const tp_init_options *opts, tp_group *g);
/* Every rank publishes its host identity; ranks with equal ones share a host. Sets g->hosts and this
 * rank's local rank (unless the launcher gave one, env_local_rank >= 0) and local world size. */
tp_status tp_boot_exchange_hosts(tp_group *g, int env_local_rank);
/* Subgroup g (prefix and size set) of parent: shares the parent's store, when it has one, and checks that
 * every rank of the parent passed rank 0's ranks. */
tp_status tp_boot_subgroup(tp_group *g, const tp_group *parent, const int *ranks);
/* Ends making g: every member of `over` (g itself, or the parent of subgroup g) checks in, world rank 0
 * last. Nothing without a store. */
tp_status tp_boot_checkout(const tp_group *g, const tp_group *over);

/* The host table's references (shared by a world and its subgroups); NULL is fine. */
tp_hosts *tp_hosts_retain(tp_hosts *h);
void tp_hosts_release(tp_hosts *h);

#endif
