"""The GPU path on a GPU: layers on the device (float32 / float64 against a float64 reference, float16 /
bfloat16 against float32 with the formats' tolerances), DLPack and __cuda_array_interface__ round trips
with torch and CuPy, no hidden host round trip, streams, and NCCL process groups.

Skipped, with the reason, where tplinear sees no GPU. On a GPU machine:
    python -m pytest -q tests/test_gpu.py
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tplinear as tp
from tplinear import _C, _device
from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not tp.cuda_available():
    _why = ("tplinear was built without CUDA" if not _C.cuda_compiled()
            else "no CUDA GPU is visible (tplinear.cuda_available() is False)")
    pytestmark = pytest.mark.skip(reason=f"GPU tests: {_why}")

# relative-norm tolerances: float32 / float64 against float64; half types against a float64 reference
# computed from the same (rounded) inputs, so only accumulation and output rounding count
TOL = {"float32": 1e-5, "float64": 1e-12, "float16": 3e-3, "bfloat16": 2e-2}
LEADS = [(), (5,), (3, 4)]


def dev(arr, dtype=None):
    return _device.to_device(arr, dtype)


def host(arr):
    return np.asarray(arr.numpy() if isinstance(arr, _device.DeviceArray) else arr, dtype=np.float64)


def make(kind, lin):
    if kind == "linear":
        return lin
    return tp.LinearAllreduce(lin, None) if kind == "row" else tp.LinearLayer(lin)


def reference(x, w, b, dy):
    y = x @ w.T + (0 if b is None else b)
    w2, x2, dy2 = w, x.reshape(-1, w.shape[1]), dy.reshape(-1, w.shape[0])
    return y, dy @ w2, dy2.T @ x2, dy2.sum(axis=0)


@pytest.mark.parametrize("kind", ["linear", "row", "column"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False])
def test_layers_on_the_gpu_match_the_reference(kind, dtype, lead, bias, rng):
    lin = tp.Linear(48, 40, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 30)), device="cuda")
    assert isinstance(lin.weight.data, _device.DeviceArray) and lin.weight.data.dtype == dtype
    layer = make(kind, lin)
    x_d = dev(rng.standard_normal(lead + (48,)).astype(np.float32), dtype)
    dy_d = dev(rng.standard_normal(lead + (40,)).astype(np.float32), dtype)
    # the reference sees exactly what the GPU sees: the rounded parameters and inputs
    w, x, dy = host(layer.weight.data), host(x_d), host(dy_d)
    b = None if layer.bias is None else host(layer.bias.data)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, dy)
    y = layer(x_d)
    assert isinstance(y, _device.DeviceArray) and y.shape == lead + (40,) and y.dtype == dtype
    assert rel_err(host(y), y_ref) < TOL[dtype]
    dx = layer.backward(dy_d)
    assert isinstance(dx, _device.DeviceArray) and dx.shape == x_d.shape
    assert rel_err(host(dx), dx_ref) < TOL[dtype]
    assert rel_err(host(layer.weight.grad), dw_ref) < TOL[dtype]
    if bias:
        assert rel_err(host(layer.bias.grad), db_ref) < TOL[dtype]


@pytest.mark.parametrize("kind", ["row", "column"])
def test_zero_size_batch_on_the_gpu(kind):
    layer = make(kind, tp.Linear(8, 6, device="cuda"))
    y = layer(_device.DeviceArray.zeros((0, 8)))
    assert y.shape == (0, 6)
    dx = layer.backward(_device.DeviceArray.zeros((0, 6)))
    assert dx.shape == (0, 8)
    assert np.all(layer.weight.grad.numpy() == 0)


def test_tf32_only_when_asked(rng):
    lin = tp.Linear(2048, 64, bias=False, device="cuda", seed=1)
    x = rng.standard_normal((64, 2048)).astype(np.float32)
    y_ref = x.astype(np.float64) @ host(lin.weight.data).T
    assert _C.cuda_get_allow_tf32() is False
    assert rel_err(host(lin(dev(x))), y_ref) < 1e-5  # true float32
    _device.set_allow_tf32(True)
    try:
        assert rel_err(host(lin(dev(x))), y_ref) < 1e-2  # TF32: 10-bit mantissa products
    finally:
        _device.set_allow_tf32(False)


def test_bias_epilogue_and_fallback_agree(rng):
    """Odd sizes (no aligned cuBLASLt algorithm for some) and aligned ones give the same math."""
    for n_in, n_out in ((7, 5), (64, 32), (33, 17)):
        lin = tp.Linear(n_in, n_out, device="cuda", seed=n_in)
        x = rng.standard_normal((9, n_in)).astype(np.float32)
        y_ref = x.astype(np.float64) @ host(lin.weight.data).T + host(lin.bias.data)
        assert rel_err(host(lin(dev(x))), y_ref) < 1e-5


def test_mixing_host_and_device_is_an_error(rng):
    gpu = tp.Linear(4, 3, device="cuda")
    with pytest.raises(ValueError, match="cpu.*cuda|cuda.*cpu"):
        gpu(np.ones((2, 4), np.float32))
    cpu = tp.Linear(4, 3)
    with pytest.raises(ValueError, match="cuda"):
        cpu(dev(np.ones((2, 4), np.float32)))


def test_device_array_basics():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = dev(a)
    np.testing.assert_array_equal(d.numpy(), a)
    np.testing.assert_array_equal(d.reshape(4, 3).numpy(), a.reshape(4, 3))
    np.testing.assert_array_equal(d.copy().numpy(), a)
    np.testing.assert_array_equal(np.asarray(d), a)
    info = _C.tensor_info(d)
    assert info["data"] == d.ptr and info["device"] == ("cuda", d.device)
    bf = dev(a, "bfloat16")
    np.testing.assert_array_equal(bf.numpy(), a)  # small integers are exact in bfloat16
    assert _C.tensor_info(bf)["dtype"] == "bfloat16"


def test_gather_output_and_full_input_on_the_gpu(rng):
    lin = tp.Linear(24, 16, device="cuda", seed=9)
    w, b = host(lin.weight.data), host(lin.bias.data)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 16)).astype(np.float32)
    col = tp.LinearLayer(lin, gather_output=True)
    y = col(dev(x))
    assert isinstance(y, _device.DeviceArray) and rel_err(host(y), x @ w.T + b) < 1e-5
    assert rel_err(host(col.backward(dev(dy))), dy @ w) < 1e-5
    row = tp.LinearAllreduce(lin, input_is_parallel=False)
    y = row(dev(x))  # the layer slices its part of a DeviceArray (a strided view)
    assert rel_err(host(y), x @ w.T + b) < 1e-5
    dx = row.backward(dev(dy))
    assert isinstance(dx, _device.DeviceArray) and rel_err(host(dx), dy @ w) < 1e-5
    view = dev(x)[..., 4:20]
    assert not view.is_contiguous and np.array_equal(view.numpy(), x[..., 4:20])


def test_gather_context_and_state_dicts_on_the_gpu():
    lin = tp.Linear(12, 10, dtype="bfloat16", device="cuda", seed=5)
    full_w = lin.weight.data.numpy()
    for layer in (tp.LinearAllreduce(lin), tp.LinearLayer(lin)):
        assert layer.weight.data.dtype == "bfloat16" and isinstance(layer.weight.data, _device.DeviceArray)
        with tp.GatherReplacedLayerParams([layer.weight, layer.bias], layer):
            np.testing.assert_array_equal(host(layer.weight.data), full_w)
        assert isinstance(layer.weight.data, _device.DeviceArray) and layer.weight.data.dtype == "bfloat16"
        sd = layer.consolidated_state_dict()
        np.testing.assert_array_equal(sd["weight"], full_w)
        layer.load_state_dict({"weight": np.zeros((10, 12), np.float32), "bias": np.ones(10, np.float32)})
        assert isinstance(layer.weight.data, _device.DeviceArray) and np.all(layer.weight.data.numpy() == 0)


# ---------------------------------------------------------------------------------------------- torch


@pytest.fixture
def torch():
    t = pytest.importorskip("torch")
    if not t.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    return t


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_dlpack_round_trip_is_zero_copy(torch, dtype):
    tdt = getattr(torch, dtype)
    lin = torch.nn.Linear(32, 24).to(device="cuda", dtype=tdt)
    layer = tp.LinearLayer(lin)  # a torch module on the GPU: the layer lives there too, same dtype
    assert layer.weight.data.dtype == dtype and layer.weight.data.device == lin.weight.device.index
    x = torch.randn(6, 32, device="cuda", dtype=tdt)
    assert _C.tensor_info(x)["data"] == x.data_ptr()  # in: zero-copy
    y = layer(x)
    t = torch.from_dlpack(y)  # out: zero-copy
    assert t.data_ptr() == y.ptr and t.dtype == tdt and t.device.type == "cuda"
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert ((t.double() - ref).norm() / ref.norm()).item() < TOL[dtype]
    t.zero_()
    assert np.all(y.numpy() == 0)  # same memory
    dy = torch.randn(6, 24, device="cuda", dtype=tdt)
    dx = torch.from_dlpack(layer.backward(dy))
    ref_dx = dy.double() @ lin.weight.double()
    assert ((dx.double() - ref_dx).norm() / ref_dx.norm()).item() < TOL[dtype]


def test_torch_views_and_transposes(torch):
    lin = tp.Linear(16, 8, device="cuda", bias=False)
    base = torch.randn(10, 20, device="cuda")
    x = base[2:7, 4:]  # row stride 20: a strided view that the GEMM reads in place
    y = torch.from_dlpack(lin(x))
    w = torch.from_dlpack(lin.weight.data)
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)


def test_no_hidden_host_round_trip(torch):
    from torch.profiler import ProfilerActivity, profile

    lin = tp.Linear(256, 128, device="cuda")
    layers = [tp.LinearAllreduce(lin), tp.LinearLayer(lin)]
    x = torch.randn(32, 256, device="cuda")
    dy = torch.randn(32, 128, device="cuda")
    for layer in layers:  # warm-up: handles, workspaces, the ones vector
        layer(x)
        layer.backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for layer in layers:
            y = layer(x)
            dx = layer.backward(dy)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "memcpy" in e.name.lower()]
    assert copies == [], f"forward/backward copied through the host: {copies}"
    for arr in (y, dx, layers[0].weight.grad, layers[0].bias.grad):
        assert _C.tensor_info(arr)["device"][0] == "cuda"


def test_shards_are_cut_and_gathered_on_the_gpu(torch):
    """A layer built from a GPU module, GatherReplacedLayerParams (gather and re-partition) and the
    gather_output backward stay on the GPU: the shards are cut by _C.shard on the device."""
    from torch.profiler import ProfilerActivity, profile

    for dtype in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(64, 48).to(device="cuda", dtype=dtype)
        tp.LinearLayer(lin)  # the default (nccl) group is made outside the profile
        x = torch.randn(4, 64, device="cuda", dtype=dtype)
        dy = torch.randn(4, 48, device="cuda", dtype=dtype)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            row, col = tp.LinearAllreduce(lin), tp.LinearLayer(lin, gather_output=True)
            for layer in (row, col):
                with tp.GatherReplacedLayerParams(layer.parameters(), layer):
                    full = torch.from_dlpack(layer.weight.data).clone()
                assert isinstance(layer.weight.data, _device.DeviceArray)
            col(x)
            dx = col.backward(dy)
            torch.cuda.synchronize()
        host = [e.name for e in prof.events() if "HtoD" in e.name or "DtoH" in e.name]
        assert host == [], f"shards went through the host: {host}"
        assert torch.equal(full, lin.weight.detach()) and torch.equal(torch.from_dlpack(row.weight.data), full)
        assert layer.weight.data.dtype == str(dtype).replace("torch.", "")
        ref = dy.double() @ lin.weight.double()
        assert ((torch.from_dlpack(dx).double() - ref).norm() / ref.norm()).item() < TOL[str(dtype)[6:]]


def test_torch_stream_is_used_and_honoured(torch):
    lin = tp.Linear(64, 64, device="cuda")
    w = torch.from_dlpack(lin.weight.data)
    b = torch.from_dlpack(lin.bias.data)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(128, 64, device="cuda")
        x.mul_(2)  # pending work on s
        _device.set_stream(s)
        try:
            y = torch.from_dlpack(lin(x))
        finally:
            _device.set_stream(None)
        ref = torch.nn.functional.linear(x, w, b)
    s.synchronize()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CuPy


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


def test_cupy_round_trip_is_zero_copy(cupy):
    lin = tp.Linear(20, 12, device="cuda")
    x = cupy.random.standard_normal((4, 20), dtype=cupy.float32)
    y = lin(x)  # CuPy in through DLPack
    c = cupy.asarray(y)  # out through __cuda_array_interface__
    assert c.data.ptr == y.ptr
    assert cupy.from_dlpack(y).data.ptr == y.ptr
    w, b = cupy.asarray(lin.weight.data), cupy.asarray(lin.bias.data)
    assert cupy.allclose(c, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_cuda_array_interface_input(cupy):
    class CAIOnly:
        def __init__(self, a):
            self.shape = a.shape
            self.__cuda_array_interface__ = a.__cuda_array_interface__

    lin = tp.Linear(20, 12, device="cuda")
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        x = cupy.random.standard_normal((4, 20), dtype=cupy.float32)
        wrapped = CAIOnly(x)  # CAI v3 carries the stream: tplinear's stream waits for it
    assert _C.tensor_info(wrapped)["data"] == x.data.ptr
    y = cupy.asarray(lin(wrapped))
    s.synchronize()  # the reference below runs on CuPy's null stream
    w, b = cupy.asarray(lin.weight.data), cupy.asarray(lin.bias.data)
    assert cupy.allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stream 0"):
        bad = CAIOnly(x)
        bad.__cuda_array_interface__ = dict(bad.__cuda_array_interface__, stream=0)
        lin(bad)


# ---------------------------------------------------------------------------------------------- NCCL


def run_script(body, nproc=1, timeout=240, extra_env=None):
    """Runs body in nproc fresh processes with torchrun's variables; returns their CompletedProcess list."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(body)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so, se))
    return out


def test_nccl_world_of_one_layers_and_collectives():
    (rc, so, se), = run_script("""
        import numpy as np
        import tplinear as tp, tplinear.distributed as dist
        from tplinear import _device
        world = dist.init_process_group(backend="nccl")
        assert world.backend == "nccl", world.backend
        rng = np.random.default_rng(0)
        for kind in (tp.LinearAllreduce, tp.LinearLayer):
            layer = kind(tp.Linear(32, 16, seed=2, device="cuda"))
            x = rng.standard_normal((5, 32)).astype(np.float32)
            dy = rng.standard_normal((5, 16)).astype(np.float32)
            w = layer.weight.data.numpy().astype(np.float64); b = layer.bias.data.numpy()
            y = layer(_device.to_device(x)).numpy()
            assert np.allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)
            dx = layer.backward(_device.to_device(dy)).numpy()
            assert np.allclose(dx, dy @ w, rtol=1e-5, atol=1e-5)
        for dt in ("float32", "float16", "bfloat16", "int32"):
            a = _device.to_device(np.arange(6, dtype=np.float32).astype("int32" if dt == "int32" else "float32"), dt)
            dist.all_reduce(a)
            assert np.all(a.numpy() == np.arange(6))
            out = _device.DeviceArray((6,), dt)
            dist.all_gather_into_tensor(out, a)
            assert np.all(out.numpy() == np.arange(6))
            dist.broadcast(a, 0)
            dist.reduce_scatter_tensor(out, a)
        dist.barrier()
        h = np.arange(3, dtype=np.float32)  # host bookkeeping arrays are staged through the GPU
        dist.all_reduce(h)
        assert np.all(h == np.arange(3))
        hg = np.empty(3, np.float32)
        dist.all_gather_into_tensor(hg, h)
        assert np.all(hg == h)
        dist.destroy_process_group()
        print("OK")
    """)
    assert rc == 0 and "OK" in so, se


@pytest.mark.skipif(_C.cuda_device_count() < 2, reason="needs 2 GPUs (NCCL puts one rank on each)")
def test_nccl_two_ranks_and_a_dead_peer():
    results = run_script("""
        import os, sys, time
        import numpy as np
        import tplinear as tp, tplinear.distributed as dist
        from tplinear import _device
        world = dist.init_process_group(backend="nccl", timeout=15)
        rank = dist.get_rank()
        a = _device.to_device(np.full(4, rank + 1, np.float32))
        dist.all_reduce(a)
        assert np.all(a.numpy() == 3), a.numpy()
        # subgroups split the world's communicator
        sub = dist.new_group([0, 1])
        dist.all_reduce(a, group=sub)
        assert np.all(a.numpy() == 6)
        if rank == 1:
            os._exit(0)  # dies without a word
        t0 = time.time()
        try:
            dist.all_reduce(a)
        except tp.CommError as exc:
            print("CommError after %.1f s: %s" % (time.time() - t0, exc))
        else:
            raise AssertionError("all_reduce with a dead peer returned")
        print("OK")
    """, nproc=2, timeout=120)
    rc0, so0, se0 = results[0]
    assert rc0 == 0 and "OK" in so0, se0


# ---------------------------------------------------------------------------------------------- issue 25
# Each test below failed (or would have: none had run on a GPU when they were written) before the fix it names.


def test_expanded_dy_is_packed_on_the_gpu(torch):
    """y.sum().backward() hands the layers an expand()ed dY (strides 0, 0): tplinear.torch makes it
    contiguous on the device, and the NumPy-API layers pack any strided GPU array (the C core refused
    'strided device arrays' before)."""
    import tplinear.torch as tpt

    torch.manual_seed(0)
    fc = torch.nn.Linear(24, 16).cuda()
    for make_layer in (tpt.LinearLayer, tpt.LinearAllreduce):
        layer = make_layer(fc)
        x = torch.randn(5, 24, device="cuda", requires_grad=True)
        layer(x).sum().backward()
        xr = x.detach().double().requires_grad_()
        wr = fc.weight.detach().double().requires_grad_()
        torch.nn.functional.linear(xr, wr, fc.bias.detach().double()).sum().backward()
        assert ((x.grad.double() - xr.grad).norm() / xr.grad.norm()).item() < TOL["float32"]
        assert ((layer.weight.grad.double() - wr.grad).norm() / wr.grad.norm()).item() < TOL["float32"]
    lin = tp.Linear(24, 16, device="cuda")
    x = torch.randn(5, 24, device="cuda")
    lin(x)
    for dy in (torch.ones(1, 1, device="cuda").expand(5, 16), torch.randn(16, 5, device="cuda").T,
               torch.randn(5, 32, device="cuda")[:, ::2], torch.randn(1, 16, device="cuda").expand(5, 16)):
        dx = torch.from_dlpack(lin.backward(dy, retain=True))
        ref = dy.double() @ torch.from_dlpack(lin.weight.data).double()
        assert ((dx.double() - ref).norm() / ref.norm()).item() < TOL["float32"], dy.stride()
    full = torch.randn(3, 1, 8, device="cuda").expand(3, 4, 8)  # a strided copy through the C core
    out = torch.empty(3, 4, 8, device="cuda")
    _C.tensor_copy(out, full)
    assert torch.equal(out, full)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cublaslt_bias_epilogue_at_odd_offsets(torch, dtype):
    """Inputs, bias and output one element past an aligned address (a row layer's x[..., off:off + size]
    at p > 1, an offset bias): cuBLASLt is told the real alignments, and a refusal falls back to cuBLAS."""
    tdt = getattr(torch, dtype)
    m, k, n = 7, 33, 19
    base_x = torch.randn(m, k + 3, device="cuda", dtype=tdt)
    base_w = torch.randn(n * k + 1, device="cuda", dtype=tdt)
    base_b = torch.randn(n + 1, device="cuda", dtype=tdt)
    base_y = torch.empty(m * n + 1, device="cuda", dtype=tdt)
    for off in (0, 1):
        x = base_x[:, off:off + k]
        w = base_w[off:off + n * k].view(n, k)
        b = base_b[off:off + n]
        y = base_y[off:off + m * n].view(m, n)
        _C.linear_forward(x, w, b, y)
        ref = x.double() @ w.double().T + b.double()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < TOL[dtype], (off, err)


def test_torch_streams_order_layers_and_collectives(torch):
    """With torch.cuda.stream(s): tplinear runs on s (ordered after s's pending writes, here held back by
    torch.cuda._sleep) and gives its own stream back afterwards, for layers and for the collectives."""
    import tplinear.distributed as dist
    import tplinear.torch as tpt

    layer = tpt.LinearLayer(torch.nn.Linear(64, 32).cuda())
    before = _C.cuda_get_stream()
    s = torch.cuda.Stream()
    x = torch.zeros(16, 64, device="cuda")
    src, out = torch.zeros(1024, device="cuda"), torch.empty(1024, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # s is busy for tens of ms
        x.fill_(1.0)
        src.fill_(3.0)
        y = layer(x)
        dist.all_gather_into_tensor(out, src)  # a world of one: a copy, on s after the fill
        out.mul_(2.0)  # torch's own later work on s, after tplinear's
    assert _C.cuda_get_stream() == before
    s.synchronize()
    ref = torch.nn.functional.linear(torch.ones(16, 64, device="cuda"), layer.weight, layer.bias)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out == 6.0)
    assert dist.get_backend() == "nccl"


def test_device_array_memory_follows_its_last_stream(torch):
    """A DeviceArray used on a side stream is ordered after that stream's work when used (or freed) on
    another one."""
    s = torch.cuda.Stream()
    a = _device.to_device(np.ones((256, 256), np.float32))
    lin = tp.Linear(256, 256, device="cuda", bias=False)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        _device.set_stream(s)
        try:
            y = lin(a)  # queued on s behind the sleep
        finally:
            _device.set_stream(None)
    host = y.numpy()  # on the legacy stream: must wait for s
    ref = np.ones((256, 256)) @ lin.weight.data.numpy().astype(np.float64).T
    assert rel_err(host, ref) < TOL["float32"]


def test_gpu_layer_after_a_host_world_of_one():
    """A host world of one made first (get_rank() before any GPU layer): a GPU layer on it is refused with a
    clear error on every call that would give it GPU memory, never a host memmove of device pointers."""
    (rc, so, se), = run_script("""
        import numpy as np
        import tplinear as tp, tplinear.distributed as dist
        from tplinear import _device
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            import os; os.environ.pop(k, None)
        assert dist.get_rank() == 0 and dist.get_backend() == "self"
        lin = tp.Linear(16, 8, device="cuda")
        for make in (lambda: tp.LinearAllreduce(lin), lambda: tp.LinearLayer(lin),
                     lambda: tp.LinearAllreduce(lin, sequence_parallel=True)):
            try:
                layer = make()
                layer(_device.to_device(np.ones((4, 16), np.float32)))
            except ValueError as e:
                assert "nccl" in str(e), e
            else:
                raise AssertionError("a GPU layer ran on a host group of one")
        print("OK")
    """)
    assert rc == 0 and "OK" in so, se


def test_nccl_world_of_one_collectives_do_not_wait_on_the_host(torch):
    """A group of one has no peer to lose: its collectives return once enqueued, and the next one only
    polls the last (one cudaEventQuery) instead of spinning until it finished, so the host stays ahead of a
    busy device."""
    import tplinear.distributed as dist
    import tplinear.torch as tpt
    from torch.profiler import ProfilerActivity, profile

    tpt.LinearAllreduce(torch.nn.Linear(8, 8).cuda())  # the default group: an nccl world of one
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    t = torch.ones(1 << 16, device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.cuda.stream(s):
            torch.cuda._sleep(100_000_000)  # the device is busy: a host wait would show as a spin
            for _ in range(4):
                dist.all_reduce(t)
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "Synchronize" in n], names
    assert names.count("cudaEventQuery") <= 4, names.count("cudaEventQuery")
    s.synchronize()
    assert torch.all(t == 1)


@pytest.mark.skipif(_C.cuda_device_count() < 2, reason="needs 2 GPUs (a stream per device)")
def test_each_device_keeps_its_own_stream(torch, rng):
    """A stream belongs to one GPU: a stream set for cuda:1 is tplinear's stream of cuda:1 only, and cuda:0's
    work still runs on cuda:0's stream (before, one process-wide stream served every device, so cuda:0's
    GEMMs and copies were queued on cuda:1's stream and failed)."""
    s1 = torch.cuda.Stream(device=1)
    before = (_device.get_stream(0), _device.get_stream(1))
    x = rng.standard_normal((5, 32)).astype(np.float32)
    _device.set_stream(s1)  # a torch stream: set for its own device
    try:
        assert _device.get_stream(1) == s1.cuda_stream and _device.get_stream(0) == before[0]
        for d in (0, 1):
            lin = tp.Linear(32, 16, seed=3, device=f"cuda:{d}")
            y = lin(_device.to_device(x, device=d))
            w, b = host(lin.weight.data), host(lin.bias.data)
            assert y.device == d and rel_err(host(y), x @ w.T + b) < TOL["float32"], d
    finally:
        _device.set_stream(before[1] or None, 1)
    assert (_device.get_stream(0), _device.get_stream(1)) == before


@pytest.mark.skipif(_C.cuda_device_count() < 2, reason="needs 2 GPUs (a group on cuda:1 while cuda:0 is current)")
def test_nccl_group_on_another_device_keeps_the_current_device(torch):
    """Creating, splitting, using and destroying an NCCL group whose GPU is cuda:1 leaves the caller's current
    device (torch's, cuda:0) current (before, init and destroy left cuda:1 current)."""
    (rc, so, se), = run_script("""
        import os
        os.environ.update(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")  # a world of one whose GPU is cuda:1
        import numpy as np, torch
        import tplinear.distributed as dist
        from tplinear import _device
        def check(step):
            assert torch.cuda.current_device() == 0, (step, torch.cuda.current_device())
            torch.cuda.set_device(0)
        torch.cuda.set_device(0)
        world = dist.init_process_group(backend="nccl")
        assert world.backend == "nccl", world.backend
        check("init")
        a = _device.to_device(np.ones(4, np.float32), device=1)
        dist.all_reduce(a)
        check("all_reduce")
        sub = dist.new_group([0])
        check("split")
        dist.all_reduce(a, group=sub)
        assert np.all(a.numpy() == 1), a.numpy()
        check("all_reduce on the split")
        dist.destroy_process_group(sub)
        check("destroy the split")
        dist.destroy_process_group()
        check("destroy the world")
        print("OK")
    """)
    assert rc == 0 and "OK" in so, se
