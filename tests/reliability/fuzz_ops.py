"""The operations the fuzz tests run inside a CommandWorld (imported by the ranks and by the test process,
which computes the references from the same data). Every operation builds its own groups and destroys them,
so a failure in one case never leaks into the next; inputs are exact in every dtype (multiples of 1/8 of
small integers), so reductions are checked bit for bit."""
import numpy as np

DTYPES = ("float32", "float64", "int32", "int64")


def data(seed, who, n, dtype):
    """Rank `who`'s n values of case `seed` (small, exactly representable)."""
    rng = np.random.default_rng([int(seed) % 2 ** 32, int(who)])
    v = rng.integers(-400, 400, int(n))
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (v / 8).astype(dt)
    if dt.kind == "c":
        return (v / 8 + 1j).astype(dt)
    if dt.kind == "b":
        return v > 0
    return v.astype(dt)


def wrap(arr, how):
    """The array as the case hands it over: contiguous, 2-d, strided, read-only, a list, 0-d, Fortran order."""
    if how == "contig":
        return arr
    if how == "2d":
        return arr.reshape(1, -1) if arr.size else arr.reshape(0, 1)
    if how == "strided":
        big = np.zeros(2 * arr.size, arr.dtype)
        big[::2] = arr
        return big[::2]
    if how == "readonly":
        arr = arr.copy()
        arr.setflags(write=False)
        return arr
    if how == "list":
        return arr.tolist()
    if how == "fortran":
        return np.asfortranarray(np.tile(arr, (2, 1)).T) if arr.size else arr
    raise ValueError(how)


def reduce_ref(stack, op, dtype, p):
    dt = np.dtype(dtype)
    if op not in ("sum", "avg", "max", "min"):
        raise ValueError(op)
    if op == "sum":
        return stack.sum(0).astype(dt)
    if op == "max":
        return stack.max(0)
    if op == "min":
        return stack.min(0)
    s = stack.sum(0)
    if dt.kind == "i":   # C's truncating division
        return (np.sign(s) * (np.abs(s) // p)).astype(dt)
    return (s / dt.type(p)).astype(dt)


def _group(dist, ranks):
    return None if ranks is None else dist.new_group(ranks)


def collective(case):
    """One collective on a fresh group (ranks None: the world). Returns the output array of this rank."""
    import tplinear.distributed as dist
    g = _group(dist, case["ranks"])
    try:
        grp = g if g is not None else dist.get_world_group()
        p, r = grp.size, grp.rank
        me = dist.get_rank()
        n, dt, how, kind = case["n"], case["dtype"], case["wrap"], case["kind"]
        if how in ("strided", "fortran"):
            n = max(n, 2)   # so that the view is really not contiguous
        if kind == "all_reduce":
            x = wrap(data(case["seed"], me, n, dt), how)
            dist.all_reduce(x, op=case["op"], group=g)
            return np.asarray(x)
        if kind == "broadcast":
            x = wrap(data(case["seed"], me, n, dt), how)
            dist.broadcast(x, group=g, group_src=case["root"])
            return np.asarray(x)
        if kind == "barrier":
            dist.barrier(group=g)
            return None
        if kind == "all_gather":
            out = np.full(max(p, 1) * n + case["out_extra"], 7, dt)
            dist.all_gather_into_tensor(out, wrap(data(case["seed"], me, n, dt), how), group=g)
            return out
        if kind == "all_gather_v":
            counts = case["counts"]
            mine = counts[r] if 0 <= r < len(counts) and isinstance(counts[r], int) and 0 <= counts[r] < 1 << 20 else n
            if how in ("strided", "fortran"):
                mine = max(mine, 2)
            total = sum(c for c in counts if isinstance(c, int) and 0 <= c < 1 << 20) + case["out_extra"]
            out = np.full(total, 7, dt)   # a negative size is refused by NumPy already
            dist.all_gather_v(out, wrap(data(case["seed"], me, mine, dt), how), counts, group=g)
            return out
        if kind == "reduce_scatter":
            out = np.full(n + case["out_extra"], 7, dt)
            dist.reduce_scatter_tensor(out, wrap(data(case["seed"], me, max(p, 1) * n, dt), how), op=case["op"],
                                       group=g)
            return out
        raise ValueError(kind)
    finally:
        if g is not None:
            dist.destroy_process_group(g)


def layer(case):
    """A tensor-parallel layer (row, column, or a column-row MLP block) on a fresh group: forward, and
    backward when asked. Returns {"y": ..., "dx": ..., "dw": ...} (this rank's arrays)."""
    import tplinear as tp
    import tplinear.distributed as dist
    g = _group(dist, case["ranks"])
    try:
        tp.set_training_mode(case["training"])
        dt, seed = case["dtype"], case["seed"]
        fin, fmid, fout = case["features"]
        x = data(seed, 99, int(np.prod(case["batch"])) * fin, dt).reshape(case["batch"] + (fin,))
        dy = data(seed, 98, int(np.prod(case["batch"])) * fout, dt).reshape(case["batch"] + (fout,))
        bad = case["bad"]
        if bad == "x_lastdim":
            x = data(seed, 99, int(np.prod(case["batch"])) * (fin + 1), dt).reshape(case["batch"] + (fin + 1,))
        elif bad == "x_int":
            x = x.astype(np.int32)
        elif bad == "x_list":
            x = x.tolist()
        elif bad == "x_strided":
            x = np.repeat(x, 2, axis=-1)[..., ::2]
        elif bad == "dy_shape":
            dy = dy[..., :-1] if fout > 1 else np.concatenate([dy, dy], -1)
        elif bad == "dy_dtype":
            dy = dy.astype(np.float64 if dt == "float32" else np.float32)
        out = {}
        if case["kind"] == "col":
            col = tp.LinearLayer(tp.Linear(fin, fout, bias=case["bias"], dtype=dt, seed=seed), g,
                                 tp_overlap_comm=case["overlap"])
            out["y"] = np.asarray(col(x))
            if case["backward"]:
                full_dy = dy
                # this rank's slice of dY: the columns its output holds
                sizes = _sizes(dist, g, out["y"].shape[-1])
                lo = sum(sizes[:_grank(dist, g)])
                out["dx"] = np.asarray(col.backward(np.ascontiguousarray(full_dy[..., lo:lo + sizes[_grank(dist, g)]])
                                                    if bad != "dy_shape" else full_dy))
                out["dw"] = np.asarray(col.weight.grad)
            return out
        if case["kind"] == "row":
            row = tp.LinearAllreduce(tp.Linear(fin, fout, bias=case["bias"], dtype=dt, seed=seed), g)
            sizes = _sizes(dist, g, row.weight.data.shape[1])
            lo = sum(sizes[:_grank(dist, g)])
            xr = x if bad in ("x_lastdim", "x_list") else x[..., lo:lo + sizes[_grank(dist, g)]]
            if bad != "x_strided" and not isinstance(xr, list):
                xr = np.ascontiguousarray(xr)
            out["y"] = np.asarray(row(xr))
            if case["backward"]:
                out["dx"] = np.asarray(row.backward(dy))
                out["dw"] = np.asarray(row.weight.grad)
            return out
        col = tp.LinearLayer(tp.Linear(fin, fmid, bias=case["bias"], dtype=dt, seed=seed), g,
                             tp_overlap_comm=case["overlap"])
        row = tp.LinearAllreduce(tp.Linear(fmid, fout, bias=case["bias"], dtype=dt, seed=seed + 1), g)
        out["y"] = np.asarray(row(col(x)))
        if case["backward"]:
            out["dx"] = np.asarray(col.backward(row.backward(dy)))
        return out
    finally:
        if g is not None:
            dist.destroy_process_group(g)


def collective_pair(a, b):
    """Rank 0 runs case a, rank 1 case b (each on a fresh group of both)."""
    import tplinear.distributed as dist
    return collective(a if dist.get_rank() == 0 else b)


def _grank(dist, g):
    return (g if g is not None else dist.get_world_group()).rank


def _sizes(dist, g, mine):
    """Every group rank's size of a split dim (an all-gather of the local sizes)."""
    grp = g if g is not None else dist.get_world_group()
    out = np.empty(grp.size, np.int64)
    dist.all_gather_into_tensor(out, np.array([mine], np.int64), group=g)
    return out.tolist()


def groups(steps):
    """A sequence of group operations; returns one outcome per step ("ok", value) / ("exc", type, message)."""
    import tplinear.distributed as dist
    made, out = [], []
    try:
        for step in steps:
            try:
                if step[0] == "new":
                    made.append(dist.new_group(step[1]))
                    out.append(("ok", made[-1].ranks))
                elif not made:
                    out.append(("ok", None))
                    continue
                else:
                    g = made[step[1] % len(made)]
                    if step[0] == "all_reduce":
                        a = np.full(step[2], float(dist.get_rank() + 1))
                        dist.all_reduce(a, group=g)
                        out.append(("ok", (a[:1].tolist(), sorted(g.ranks), g.rank)))
                    elif step[0] == "barrier":
                        dist.barrier(group=g)
                        out.append(("ok", None))
                    elif step[0] == "destroy":
                        dist.destroy_process_group(g)
                        out.append(("ok", None))
                    elif step[0] == "abort":
                        dist.abort(g)
                        out.append(("ok", None))
                    elif step[0] == "info":
                        out.append(("ok", (g.rank, g.size, g.ranks)))
            except Exception as e:
                out.append(("exc", type(e).__name__, str(e)[:300]))
    finally:
        for g in made:
            try:
                dist.destroy_process_group(g)
            except ValueError:   # destroyed by a step already
                pass
    return out
