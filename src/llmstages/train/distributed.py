"""Distributed training on the engines PyTorch ships: one process per device, launched by `torchrun`.

    torchrun --nproc_per_node=2 -m llmstages pretrain --config configs/pretrain/tiny.yaml dist.strategy=fsdp

`setup` (called by every stage through `train.start.start_run`) joins the process group and records this
process's place in the job; `current()` returns it anywhere after that. The strategies:

    ddp      DistributedDataParallel: a full replica per process, gradients all-reduced (averaged).
    zero1    ddp + ZeroRedundancyOptimizer: the AdamW state is split across processes.
    fsdp     FSDP2 `fully_shard` per transformer block and the root: parameters, gradients and optimizer state
             sharded; dist.reshard_after_forward true is ZeRO-3, false ZeRO-2.
    tp       tensor parallel (DTensor): q/k/v and gate/up column-wise, o/down row-wise; heads split over ranks.
    pp       pipeline parallel (torch.distributed.pipelining): consecutive blocks per rank, GPipe or 1F1B.
    fsdp+tp  a 2-D mesh (data x tensor): tp inside, fsdp across.

Data parallelism (ddp, zero1, fsdp, the data axis of fsdp+tp) splits every micro-batch: the global batch of
a step is train.batch_size x train.grad_accum x the data-parallel size, and rank r takes rows
[r * batch_size, (r + 1) * batch_size) of each global micro-batch. The loop divides every rank's summed loss by
the unit count of the whole step and multiplies by the data-parallel size (DDP and FSDP average gradients), so
the update equals the single-process one with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmstages.config import DistArgs
from llmstages.errors import UserError

STRATEGIES = ("none", "ddp", "zero1", "fsdp", "tp", "pp", "fsdp+tp")
SHARDED = ("fsdp", "tp", "pp", "fsdp+tp")
"""Strategies whose checkpoints are sharded (torch.distributed.checkpoint) rather than one file."""
PRETRAIN_ONLY = ("tp", "pp", "fsdp+tp")
"""Strategies that change the model's modules (split heads, cut layers): pre-training only for now."""


@dataclass
class Dist:
    """This process's place in the job."""

    strategy: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp: int = 1
    """Data-parallel size: how many processes split each global batch."""
    dp_rank: int = 0
    tp: int = 1
    pp: int = 1
    args: DistArgs = field(default_factory=DistArgs)
    mesh: Any = None
    """The DeviceMesh (dims named dp and/or tp) for fsdp, tp and fsdp+tp."""
    dp_group: Any = None
    """The process group of this rank's data-parallel replicas (None: the whole job)."""
    long_group: Any = None
    """A gloo group with a day-long timeout, for `wait_for_main`."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.strategy != "none"

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    # -- collectives that are no-ops in a single process --------------------------------------------------------
    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def sum(self, values: list[float], group: Any = None, op: Any = None) -> list[float]:
        """Element-wise sum (or `op`) over all ranks, or over `group` (float64)."""
        if not dist.is_initialized() or self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=group)
        return t.tolist()

    def dp_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the data-parallel replicas (the ranks that hold different rows)."""
        return self.sum(values, self.dp_group) if self.dp > 1 else list(values)

    def dp_mean(self, value: float) -> float:
        """Mean over the data-parallel replicas (each holds its own share of a rollout or batch)."""
        return self.dp_sum([value])[0] / self.dp

    def wait_for_main(self) -> None:
        """Wait for rank 0 to finish preparing something (tokenizing a corpus): a barrier without the
        collective timeout, which is meant for hung training steps, not for long preparations."""
        if dist.is_initialized() and self.world > 1:
            dist.barrier(group=self.long_group)

    def max(self, value: float) -> float:
        return self.sum([value], op=dist.ReduceOp.MAX)[0]

    def share_from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank, waiting as long as rank 0 needs (the day-long group, not the collective
        timeout: rank 0 may be training a tokenizer)."""
        if not dist.is_initialized() or self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.long_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if not dist.is_initialized() or self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def rows(self, n: int) -> slice:
        """This rank's rows of a global micro-batch of n = batch_size x dp rows."""
        per = n // self.dp
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)


_CURRENT = Dist()


def current() -> Dist:
    """The process's place in the job (a single process until `setup` joined a group)."""
    return _CURRENT


def launched() -> bool:
    """True under torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(args: DistArgs, device: torch.device, stage: str) -> Dist:
    """Check the strategy, join the process group (once per process) and return this process's place."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    strategy = args.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "deepspeed":
        raise UserError(
            "dist.strategy=deepspeed is not built; PyTorch's own engines cover it: zero1 (ZeRO-1), fsdp with "
            "dist.reshard_after_forward=false (ZeRO-2) or true (ZeRO-3)"
        )
    if strategy not in STRATEGIES:
        raise UserError(f"dist.strategy must be auto or one of {', '.join(STRATEGIES)}, got '{args.strategy}'")
    if args.backend not in ("auto", "nccl", "gloo"):
        raise UserError(f"dist.backend must be auto, nccl or gloo, got '{args.backend}'")
    if args.schedule not in ("gpipe", "1f1b"):
        raise UserError(f"dist.schedule must be gpipe or 1f1b, got '{args.schedule}'")
    if strategy in PRETRAIN_ONLY and stage != "pretrain":
        raise UserError(
            f"dist.strategy={strategy} is supported by pretrain only; {stage} runs under ddp, zero1 or fsdp"
        )
    if strategy != "none" and not launched():
        raise UserError(
            f"dist.strategy={strategy} needs a launcher: torchrun --nproc_per_node=N -m llmstages {stage} ... "
            "(or leave dist.strategy=auto)"
        )
    if strategy == "none" and world > 1:
        raise UserError(f"dist.strategy=none with {world} processes would train {world} unrelated models; use ddp")
    if strategy == "fsdp+tp" and (args.tp_size < 2 or world % args.tp_size or world // args.tp_size < 2):
        raise UserError(
            f"dist.strategy=fsdp+tp needs a world size that is a multiple of dist.tp_size={args.tp_size} with at "
            f"least 2 data-parallel groups; this job has {world} processes"
        )
    if strategy == "pp" and args.microbatches < world:
        raise UserError(
            f"dist.microbatches={args.microbatches}: a pipeline of {world} stages needs at least {world} micro-batches"
        )
    if args.cpu_offload and strategy != "fsdp":
        raise UserError(f"dist.cpu_offload applies to dist.strategy=fsdp, not {strategy}")
    if args.cpu_offload and device.type != "cuda":
        raise UserError("dist.cpu_offload moves state from the GPU to CPU memory; this run is already on the CPU")
    if strategy == "none":
        _CURRENT = Dist(args=args, device=device)
        return _CURRENT

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = args.backend if args.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    d = Dist(strategy=strategy, rank=rank, world=world, local_rank=local_rank, args=args, device=device)
    from torch.distributed.device_mesh import init_device_mesh

    if strategy in ("ddp", "zero1", "fsdp"):
        d.dp, d.dp_rank = world, rank
        if strategy == "fsdp":
            d.mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    elif strategy == "tp":
        d.tp = world
        d.mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    elif strategy == "pp":
        d.pp = world
    else:  # fsdp+tp: ranks [k * tp, (k + 1) * tp) form tensor-parallel group k
        d.tp, d.dp = args.tp_size, world // args.tp_size
        d.dp_rank = rank // args.tp_size
        d.mesh = init_device_mesh(device.type, (d.dp, d.tp), mesh_dim_names=("dp", "tp"))
        d.dp_group = d.mesh["dp"].get_group()
    d.long_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    _CURRENT = d
    return d


def shutdown() -> None:
    """Leave the process group cleanly: a barrier first, so no rank tears down while another still talks to it
    (FSDP2 on gloo can abort at exit otherwise)."""
    global _CURRENT
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    _CURRENT = Dist()


def abort() -> None:
    """Leave the process group after an error, without waiting for the other ranks."""
    global _CURRENT
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # already failing; the launcher ends the others
            dist.destroy_process_group()
    _CURRENT = Dist()


# ----------------------------------------------------------------------------------------------------------------
# Wrapping the model


class _Methods(nn.Module):
    """Lets DDP's forward run any method of the wrapped model: forward(name, *args) -> model.name(*args)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)


class DDPModel:
    """What a loss function sees under ddp/zero1: calls (and `hidden_states`) go through DDP's forward, which
    arms the gradient all-reduce; every other attribute is the model's own."""

    def __init__(self, model: nn.Module, ddp: nn.Module) -> None:
        self._model, self._ddp = model, ddp

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp("forward", *args, **kwargs)

    def hidden_states(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp("hidden_states", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block in the model (a policy's, a critic's, a reward model's trunk)."""
    from llmstages.model.gpt import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def wrap(model: nn.Module, d: Dist, precision: str = "fp32") -> Any:
    """Apply the strategy to `model` in place where it shards (fsdp, tp); returns what the loss function is
    given: the model itself or a DDPModel. Pipeline parallel (pp) is `pipeline.Pipeline(model, d)` instead."""
    if d.strategy == "none":
        return model
    if d.strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDPModel(model, DDP(_Methods(model), device_ids=ids))
    if d.strategy in ("tp", "fsdp+tp"):
        tensor_parallel(model, d.mesh["tp"])
    if d.strategy in ("fsdp", "fsdp+tp"):
        shard_fsdp(model, d, precision)
        return model
    return model


def shard_fsdp(model: nn.Module, d: Dist, precision: str = "fp32") -> None:
    """FSDP2: each block its own unit (gathered just before it runs), the rest in the root unit."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method as register

    mesh = d.mesh["dp"]
    kw: dict[str, Any] = {}
    if d.args.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if precision in ("bf16", "fp16"):
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=d.args.reshard_after_forward, **kw)
    # The root keeps its parameters gathered from forward to backward: loss functions read the LM head's
    # weight directly (the fused cross-entropy).
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **kw)
    if hasattr(model, "hidden_states"):  # loss functions call it instead of forward
        register(model, "hidden_states")


def tensor_parallel(model: nn.Module, mesh: Any) -> None:
    """Megatron-style TP on every block: q/k/v and gate/up split by output features (column-wise), o and down
    by input features (row-wise, one all-reduce each); the heads are split across ranks. Embeddings, norms and
    the LM head stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    for block in transformer_blocks(model):
        attn = block.attn
        if attn.n_heads % tp or attn.n_kv_heads % tp:
            raise UserError(
                f"dist.strategy=tp: {attn.n_heads} heads ({attn.n_kv_heads} key/value heads) do not split over "
                f"{tp} ranks"
            )
        plan = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if block.mlp.gated:
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        attn.n_heads //= tp
        attn.n_kv_heads //= tp


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under fsdp: every shard of `model` gathered for the duration (sampling and evaluation call the model's
    parts outside its forward, token by token); elsewhere nothing happens."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    units[0]._get_fsdp_state()._lazy_init()  # the root first (FSDP2 does this in the root's first forward)
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(current().args.reshard_after_forward if m is not model else False)


# ----------------------------------------------------------------------------------------------------------------
# Gradients, state dicts


def grad_norm(params: list[torch.Tensor], d: Dist) -> torch.Tensor:
    """The global L2 norm of the gradients: sharded (DTensor) gradients summed over their shards, replicated
    ones counted once, and (pp) every stage's parameters together."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.zeros((), dtype=torch.float64)
    if plain:
        sq = sq + torch.nn.utils.get_total_norm(plain, 2.0).double().cpu() ** 2
    by_mesh: dict[Any, list[torch.Tensor]] = {}  # fsdp+tp: block weights on the 2-D mesh, the rest on dp only
    for g in sharded:
        by_mesh.setdefault(g.device_mesh, []).append(g)
    for group in by_mesh.values():
        n = torch.nn.utils.get_total_norm(group, 2.0)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        sq = sq + n.double().cpu() ** 2
    if d.strategy == "pp":
        sq = torch.tensor(d.sum([float(sq)])[0], dtype=torch.float64)
    return sq.sqrt()


def clip_grads(
    params: list[torch.Tensor], max_norm: float, d: Dist, counted: list[torch.Tensor] | None = None
) -> float:
    """Scale gradients so their global norm is at most max_norm (torch's clip_grad_norm_ rule); returns the norm
    before clipping. `counted`: the parameters whose gradients make up the norm (default all; pp counts a tied
    weight once)."""
    norm = float(grad_norm(counted if counted is not None else params, d))
    if max_norm != float("inf") and norm == norm:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


def meta_template(model: nn.Module) -> nn.Module:
    """A copy of the model's structure with parameters on the meta device (no memory): filled from a full state
    dict when the sharded model is exported."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU at rank 0 (None elsewhere), gathered from every shard or stage of a
    sharded strategy."""
    if d.strategy == "pp":
        parts = d.gather_objects({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return {k: v for part in parts for k, v in part.items()} if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if d.is_main else None


def export(model: nn.Module, template: nn.Module | None, d: Dist) -> nn.Module | None:
    """A plain (unsharded, unwrapped) copy of the trained model on rank 0 for saving; None on other ranks.
    `template` is `meta_template(model)` taken before sharding (None when the model was never sharded)."""
    if not d.sharded:
        return model if d.is_main else None
    full = full_state_dict(model, d)
    if not d.is_main:
        return None
    own = template.state_dict()
    missing = [k for k in own if k not in full]
    if missing:
        raise RuntimeError(f"export: gathered state dict lacks {missing[:3]}")
    template.load_state_dict({k: full[k] for k in own}, assign=True, strict=True)
    from llmstages.model.gpt import GPT

    for m in template.modules():
        if isinstance(m, GPT):
            m.reset_rope("cpu")
            if m.config.tie_embeddings:
                m.lm_head.weight = m.tok_emb.weight
    return template
