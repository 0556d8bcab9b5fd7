"""torch.distributed-style process groups over the C core's backends (shm; mpi in MPI builds; nccl in
CUDA builds).

    import tplinear.distributed as dist
    dist.init_process_group()            # the C core reads RANK, WORLD_SIZE, ... (torchrun's variables)
    dist.all_reduce(arr)                 # in place on a C-contiguous NumPy array

The launcher's environment and the TPLINEAR_* knobs are read by the C core only (``_C.world_env()``,
``_C.env_knobs()``); backend names are validated there too.
"""
import numpy as np

from . import _C
from . import _anydtype
from ._device import stream_for

CommError = _C.CommError

_world = None  # the default group (a ProcessGroup), set by init_process_group


class ProcessGroup:
    """A process group. Non-members hold a handle whose rank is -1 and whose collectives raise."""

    def __init__(self, handle):
        self._handle = handle

    def _info(key):  # noqa: N805 - builds the read-only properties below
        return property(lambda self: _C.group_info(self._handle)[key])

    rank = _info("rank")
    size = _info("size")
    ranks = _info("ranks")  # global ranks of the members, in group order
    backend = _info("backend")
    timeout = _info("timeout")
    del _info

    def is_member(self):
        return self.rank >= 0

    # A group is a live connection to the other ranks: copies of what holds one (copy.deepcopy of a model)
    # share it, as torch's ProcessGroup and DeviceMesh do; pickling it is a TypeError.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce_ex__(self, protocol):
        raise TypeError("a tplinear ProcessGroup cannot be pickled: it is a live connection to the other ranks of "
                        "this job (copy.deepcopy shares it; another process makes its own with init_process_group "
                        "/ new_group)")

    def __repr__(self):
        info = _C.group_info(self._handle)
        return f"ProcessGroup(rank={info['rank']}, size={info['size']}, backend={info['backend']!r})"


def is_initialized():
    return _world is not None


def available_backends():
    """The backends this build registers, in the order backend=None considers them (e.g. ['shm', 'nccl'])."""
    return _C.backends()


def init_process_group(backend=None, timeout=300.0, rank=None, world_size=None, init_method=None, token=None):
    """Creates the default group from the environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; under mpirun/mpiexec/srun the MPI launcher's variables,
    no MASTER_* needed in MPI builds; under torchrun its agent's store); nothing set means a world of
    one. backend: None (auto) or one of available_backends() ("shm", "mpi", "nccl"); "gloo" is accepted
    as torch-compatible sugar for the CPU backend "shm"; a backend this build lacks says how to get it.
    Every wait is bounded by timeout seconds (a datetime.timedelta works too).

    token: the world's secret (a str of 1..256 characters, the same on every rank). Every rank proves it
    to join the rendezvous (rank 0's store; under torchrun, with every value it puts in the agent's store)
    and to map the world's shared memory, so no other process (another job on the same port, another
    user) can join the world; a rank with another token is refused with a CommError on both sides. None:
    TPLINEAR_TOKEN, which ``python -m tplinear.run`` sets to a fresh random value per run; else under
    mpirun/mpiexec/srun a fresh random one that rank 0 sends through MPI; else a value derived from the
    launcher's job id, MASTER_ADDR, MASTER_PORT and WORLD_SIZE (docs/security.md says what each launcher
    gets). Each call starts a fresh world, also on the same MASTER_PORT.

    backend=None picks, in order: the TPLINEAR_BACKEND environment variable; a backend that takes GPU
    memory ("nccl") when the group is created implicitly by a layer whose tensors are on the GPU
    (device="cuda", or a module whose weight is a GPU array); otherwise the CPU default: "mpi" when an
    MPI launcher started the processes (on one host or many), "shm" when all ranks share a host. A world
    that spans hosts without MPI is an error naming the hosts. A GPU training script that calls
    init_process_group() itself should pass backend="nccl" (as with torch)."""
    return _init(backend, timeout, rank, world_size, init_method, device="cpu", token=token)


def _init(backend, timeout, rank, world_size, init_method, device, token=None):
    global _world
    if _world is not None:
        raise RuntimeError("the default process group is already initialized; call destroy_process_group() first")
    if backend == "gloo":  # torch scripts say gloo for CPU; shm is the CPU backend here
        backend = "shm"
    if hasattr(timeout, "total_seconds"):
        timeout = timeout.total_seconds()
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if init_method is not None and not str(init_method).startswith("env://"):
        raise ValueError("only init_method='env://' (torchrun's environment) is supported")
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend must be None or a name such as 'shm' or 'nccl', got {backend!r}")
    if token is not None and (not isinstance(token, str) or not 0 < len(token) <= 256 or "\0" in token):
        raise ValueError("token must be None or a string of 1..256 characters without NUL")
    _world = ProcessGroup(_C.init_world(backend, timeout, rank, world_size, device, token))
    return _world


def _default(gpu=False):
    """The default group; a world of one is created on first use when the environment names no world
    (with a backend that takes GPU memory when the layer asking for it lives on the GPU)."""
    if _world is None:
        n = _C.world_env()["world_size"] or 1
        if n > 1:
            raise RuntimeError(
                f"this process is one of {n} ranks (WORLD_SIZE={n}): call "
                "tplinear.distributed.init_process_group() before using collectives or layers")
        _init(None, 300.0, None, None, None, device="cuda" if gpu else "cpu")
    return _world


def resolve_group(group, gpu=False):
    """The group a call acts on: group itself (a ProcessGroup), or the default group when it is None
    (created on first use; with a backend that takes GPU memory when gpu). What every tplinear function
    with a group= or mp_group= argument resolves it with."""
    if group is None:
        return _default(gpu)
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"group must be a tplinear.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


def gather_extents(group, local):
    """Every rank's (offset, size) of a dimension split in rank order, from each rank's own size local
    (one all-gather over group): what sequence-parallel inputs and vocabulary shards use when the full
    size is not given."""
    sizes = np.array([int(local)], dtype=np.int64)
    if group.size > 1:
        mine, sizes = sizes, np.empty(group.size, dtype=np.int64)
        all_gather_into_tensor(sizes, mine, group=group)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [(int(o), int(s)) for o, s in zip(offsets, sizes)]


def get_world_group():
    return _default()


def get_rank(group=None):
    return resolve_group(group).rank


def get_world_size(group=None):
    return resolve_group(group).size


def get_backend(group=None):
    return resolve_group(group).backend


def new_group(ranks=None, backend=None):
    """Collective over the default group: every rank calls it with the same ranks (and backend).
    Non-members get a group they cannot use for collectives (as in torch).

    backend: None makes the group the way the world's backend makes subgroups (MPI_Comm_split for mpi,
    ncclCommSplit for nccl, a segment of its own for shm); a name makes it a group of that backend, e.g.
    an "shm" group of the ranks of one host inside an "mpi" world (tensor parallelism inside a node,
    data parallelism across nodes); "auto" takes "shm" when the ranks share a host, else the world's
    backend. "gloo" means "shm", as in init_process_group."""
    world = _default()
    if ranks is None:
        ranks = range(world.size)
    if backend == "gloo":
        backend = "shm"
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend must be None or a name such as 'shm' or 'mpi', got {backend!r}")
    return ProcessGroup(_C.new_group(world._handle, [int(r) for r in ranks], backend))


def all_reduce(tensor, op="sum", group=None):
    """In place on a C-contiguous array of float32, float64, int32, int64, float16 or bfloat16 (half precision:
    reduced in float32, rounded once). op: "sum", "avg", "max", "min" (or ReduceOp.*). Integer sums wrap around; "avg" of integers is the sum divided by the
    group size with C's truncating division. Every rank gets bitwise identical results. Raises
    TypeError / ValueError for a bad array, ValueError on a rank that is not a member of group, and
    tplinear.CommError when a peer died, timed out or called a different collective (the group is
    unusable afterwards)."""
    with stream_for(tensor):
        _C.all_reduce(resolve_group(group)._handle, tensor, _op(op))


def all_gather_into_tensor(output_tensor, input_tensor, group=None):
    """Every rank's input_tensor, one after another in rank order, into output_tensor (group size x as many
    elements). Any fixed-size NumPy dtype moves (integers, bool, complex, float16, bytes, void, structured);
    ranks whose arrays differ in size or dtype raise ValueError on every rank. Object arrays are a TypeError:
    use all_gather_object."""
    g = resolve_group(group)
    if _anydtype.movable(input_tensor, "input", "all_gather") or _anydtype.movable(output_tensor, "output", "all_gather"):
        _anydtype.all_gather(g._handle, output_tensor, input_tensor)
        return
    with stream_for(output_tensor, input_tensor):
        _C.all_gather(g._handle, output_tensor, input_tensor)


def all_gather_v(output_tensor, input_tensor, counts, group=None):
    """Variable-count all-gather: rank r contributes counts[r] elements, placed one after another."""
    with stream_for(output_tensor, input_tensor):
        _C.all_gather(resolve_group(group)._handle, output_tensor, input_tensor, list(counts))


def reduce_scatter_tensor(output, input, op="sum", group=None):
    with stream_for(output, input):
        _C.reduce_scatter(resolve_group(group)._handle, output, input, _op(op))


def reduce_scatter_v(output, input, counts, op="sum", group=None):
    """Variable-count reduce-scatter: input holds sum(counts) elements, rank r's block (counts[r] elements,
    after the blocks of the ranks before it) is reduced into rank r's output (counts[rank] elements). Every
    rank passes the same counts."""
    with stream_for(output, input):
        _C.reduce_scatter(resolve_group(group)._handle, output, input, _op(op), list(counts))


def broadcast(tensor, src=None, group=None, *, group_src=None):
    """In place from the root, as torch.distributed.broadcast: src is the root's GLOBAL rank (its rank in
    the default group), group_src its rank within group; give exactly one. A src that is not a member of
    group is a ValueError (torch raises too), never another rank's data. Any fixed-size NumPy dtype moves (see all_gather_into_tensor); object
    arrays are a TypeError: use broadcast_object_list."""
    g = resolve_group(group)
    root = _root(g, src, group_src, "src")
    if _anydtype.movable(tensor, "tensor", "broadcast"):
        _anydtype.broadcast(g._handle, tensor, root)
        return
    with stream_for(tensor):
        _C.broadcast(g._handle, tensor, root)


def broadcast_object_list(object_list, src=None, group=None, device=None, *, group_src=None):
    """torch.distributed.broadcast_object_list: the root's picklable objects replace the items of every
    other rank's object_list (a list of the same length on every rank; a difference is a ValueError on
    every rank). src / group_src as in broadcast. device is accepted for torch compatibility and ignored
    (the bytes move on the CPU). Unpickles what the root sent: only the world's ranks can join it
    (docs/security.md)."""
    g = resolve_group(group)
    _anydtype.broadcast_object_list(g._handle, object_list, _root(g, src, group_src, "src"))


def all_gather_object(object_list, obj, group=None):
    """torch.distributed.all_gather_object: object_list (a list of the group's size) gets every rank's
    picklable obj, in rank order."""
    _anydtype.all_gather_object(resolve_group(group)._handle, object_list, obj)


def get_group_rank(group, global_rank):
    """The rank within group of the process whose global rank is global_rank (torch's name); ValueError
    when it is not a member."""
    g = resolve_group(group)
    ranks = g.ranks
    global_rank = _rank_arg(global_rank, "global_rank")
    if global_rank not in ranks:
        raise ValueError(f"global rank {global_rank} is not a member of the group (its global ranks: {ranks})")
    return ranks.index(global_rank)


def get_global_rank(group, group_rank):
    """The global rank of the group's member group_rank (torch's name); ValueError when out of range."""
    ranks = resolve_group(group).ranks
    group_rank = _rank_arg(group_rank, "group_rank")
    if not 0 <= group_rank < len(ranks):
        raise ValueError(f"group rank {group_rank} is out of range for a group of {len(ranks)}")
    return ranks[group_rank]


def _root(g, src, group_src, what):
    """The group rank of a collective's root given as torch gives it: `what` (a global rank) or
    group_<what> (a rank within g), exactly one of them."""
    if (src is None) == (group_src is None):
        raise ValueError(f"give exactly one of {what}= (a global rank) and group_{what}= (a rank within the "
                         f"group), got {what}={src!r}, group_{what}={group_src!r}")
    if g.rank < 0:
        return 0  # a non-member: the C core raises "not a member"
    if group_src is not None:
        get_global_rank(g, group_src)  # checks the range
        return int(group_src)
    ranks = g.ranks
    src = _rank_arg(src, what)
    if src not in ranks:
        raise ValueError(f"{what}={src} is a global rank that is not a member of the group (its global ranks: "
                         f"{ranks}); pass group_{what}= for a rank within the group")
    return ranks.index(src)


def _rank_arg(v, what):
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(v).__name__}")
    return int(v)


def agree_on_failure(group, failure, message="failed on rank(s) {ranks} of the group (see their errors)"):
    """Every rank of group learns whether any rank failed, so none goes on (or commits) alone: the failing
    rank raises failure (an exception or None), the others RuntimeError(message.format(ranks=[...])).
    Collective over group (nothing to do for None or a group of one)."""
    if group is not None and group.size > 1:
        flags = np.zeros(group.size, dtype=np.int32)
        flags[group.rank] = failure is not None
        all_reduce(flags, "max", group=group)
    else:
        flags = np.zeros(1, dtype=np.int32)
    if failure is not None:
        raise failure
    bad = np.flatnonzero(flags).tolist()
    if bad:
        raise RuntimeError(message.format(ranks=bad))


def barrier(group=None):
    _C.barrier(resolve_group(group)._handle)


def abort(group=None):
    """Marks the group (default: the world) failed: collectives waiting on any rank of it raise
    CommError at once, and every later collective on it raises. Safe to call from another thread."""
    _C.abort(resolve_group(group)._handle)


def destroy_process_group(group=None):
    """Destroys group, or the default group (and with it the world) when group is None. Safe while another
    thread is inside a collective or a layer call on that group: the call raises CommError at once, and
    the group is freed after it has returned."""
    global _world
    if group is None:
        if _world is not None:
            _C.destroy(_world._handle)
            _world = None
        return
    _C.destroy(resolve_group(group)._handle)


def _op(op):
    if isinstance(op, str):
        return op.lower()
    name = getattr(op, "name", None)  # enum-like ReduceOp.SUM
    if isinstance(name, str):
        return name.lower()
    raise TypeError(f"op must be 'sum', 'avg', 'max' or 'min', got {op!r}")


class ReduceOp:
    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
