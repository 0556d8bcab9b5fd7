"""tplinear for PyTorch training scripts: DeepSpeed AutoTP's tensor-parallel layers as torch.nn.Modules with
autograd, on tplinear's C core and process groups (zero-copy), and one call that tensor-parallelises a
model.

    import tplinear.torch as tpt
    model = tpt.parallelize(model)          # nn.Linear / Conv1D -> LinearLayer / LinearAllreduce by a plan
    opt = torch.optim.AdamW(model.parameters())

Needs the optional extra: ``pip install 'tplinear[torch]'``. See docs/torch.md.
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("tplinear.torch needs PyTorch: pip install 'tplinear[torch]' (or pip install torch)") from exc

from ..partition import (  # noqa: F401
    attention_heads, get_tp_grain_size, is_autotp_training_mode, is_training_mode, set_autotp_mode, set_tp_grain_size,
    sequence_ranges, set_training_mode, shard_ranges,
)
from ..parameter import GatherReplacedLayerParams
from .checkpoint import load_checkpoint, save_checkpoint
from .modules import (
    Conv_LinearALlreduce,
    LinearAllreduce,
    LinearAllreduceWithReplicatedInput,
    LinearLayer,
    TorchPlacement,
    conv_LinearLayer,
    fused_LinearLayer,
    release_grad_buffers,
)
from .parallel import STYLES, parallelize, tp_modules
from .sequence import (
    allreduce_gradients,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from .vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy
from .training import check_replicas, clip_grad_norm_, full_state_dict, get_total_norm, set_num_threads
from .training import share_threads as _share_threads

_share_threads()  # tplinear's BLAS threads = torch's intra-op threads (docs/torch.md, "Threads")

__all__ = [
    "VocabParallelEmbedding", "allreduce_gradients", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region", "sequence_ranges",
    "vocab_parallel_cross_entropy",
    "attention_heads", "get_tp_grain_size", "set_tp_grain_size", "shard_ranges", "Conv_LinearALlreduce", "GatherReplacedLayerParams", "LinearAllreduce", "LinearAllreduceWithReplicatedInput",
    "LinearLayer", "TorchPlacement", "conv_LinearLayer", "fused_LinearLayer", "is_autotp_training_mode",
    "is_training_mode", "load_checkpoint", "parallelize", "release_grad_buffers", "save_checkpoint", "STYLES",
    "tp_modules", "set_autotp_mode", "set_training_mode",
    "check_replicas", "clip_grad_norm_", "full_state_dict", "get_total_norm", "set_num_threads",
]
