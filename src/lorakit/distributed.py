"""Data-parallel training on torch.distributed, launched by torchrun (one process per device).

    torchrun --nproc_per_node N -m lorakit train CONFIG.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; lorakit joins the process group (NCCL on GPUs,
gloo on CPU), wraps the model in DistributedDataParallel (strategy "ddp") or shards it with FSDP2
(strategy "fsdp"), and gives each rank its slice of every global micro-batch. Only rank 0 writes
files. A rank that dies makes torchrun stop the others; a collective that waits longer than
train.dist_timeout_s fails instead of hanging.

What FSDP2 shards (strategy "fsdp", one FSDP unit per decoder layer plus the root, which holds the
embeddings, the final norm and the output head): every parameter, frozen or trainable, as a
DTensor split along dim 0 over the ranks; hence also the gradients and the optimizer states
(created like their parameter). NF4 bases: the packed 4-bit codes and the block scales (absmax, DQ
scales) are re-registered as frozen uint8/float32 parameters so they are sharded too; the code
tables (16 + 256 floats) and the DQ offset (one float) stay replicated buffers, as do non-NF4
buffers (rotary inv_freq). A layer's parameters exist in full only while it runs (all-gathered in
its forward and again in its backward); the root's (embeddings, head) from the step's forward to
the end of its backward.

Start-up under FSDP (train() loading the model itself): every rank builds the model on the meta
device, adds the adapters (on the CPU, from the same seed), then reads the checkpoint one decoder
layer at a time and shards it before reading the next (wrap's `fill`), the root last. So a rank
holds at most its shards plus one whole layer (or the root) of the base: a model larger than one
device starts. A model passed in already built (train(prepared=...)) is sharded as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "auto", timeout_s: float = 600) -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but torch sees no CUDA device; valid here: auto, cpu")
    target = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(target)
    ctx = Context(rank, world, local_rank, target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=target if cuda else None)
        # a run that fails never reaches teardown(): free the group before the interpreter shuts
        # down (not later, from whichever object happens to be freed last), without a barrier
        atexit.register(teardown, ctx, leave_together=False)
    return ctx


def teardown(ctx: Context, leave_together: bool = True) -> None:
    """Leave the process group and free it here, in an order that cannot deadlock.

    Why the order matters (issue 11): ProcessGroupGloo's destructor joins gloo's worker threads,
    and a worker thread may still be freeing a finished collective whose tensors were made in
    Python (all_gather_object's, kept alive by the barrier that followed it); freeing such a
    tensor takes the GIL. torch's Python ProcessGroup object lets the GIL go while it drops its
    reference, so the join is safe when that object is the last owner. It is not safe when the
    last owner is C++ code that runs with the GIL held: the DDP Reducer (freed with the DDP
    module when train() returns: the hang of issue 11, Reducer::~Reducer -> thread::join) or
    torch's group registry (cleared inside destroy_process_group). So: hold the Python object,
    free the Reducers, destroy the group (torch's tables and registry let go), then drop the
    object. Whatever still holds the group afterwards is Python (DDP's process_group attribute,
    FSDP's mesh info), so the group is freed without the GIL, here or when the model is freed.

    leave_together: wait at a barrier first (the normal end of a run); False on a failure, when
    another rank may never reach the barrier."""
    if not (ctx.active and dist.is_initialized()):
        return
    group = dist.distributed_c10d._get_default_group()  # the last owner, see above
    if leave_together:
        dist.barrier()  # a rank tearing down while another still talks to it can hang
    for module in list(_ddp_modules):
        _release_reducer(module)
    dist.destroy_process_group()
    del group  # ProcessGroupGloo's destructor runs now, without the GIL


# every DistributedDataParallel that wrap() made and that is alive: teardown frees their Reducers
_ddp_modules: weakref.WeakSet = weakref.WeakSet()


def _release_reducer(ddp: torch.nn.Module) -> None:
    """Drop a DDP module's C++ Reducer (and the Logger that shares it): each holds the process
    group, and their destructors run with the GIL held. The module cannot train afterwards."""
    for name, value in list(vars(ddp).items()):
        if isinstance(value, (dist.Reducer, dist.Logger)):
            delattr(ddp, name)


def wrap(model: torch.nn.Module, ctx: Context, strategy: str, fill=None,
         probe: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """DDP averages the gradients of the trainable parameters; FSDP2 shards every parameter
    (frozen base, NF4 codes and scales, adapters) across ranks, one decoder layer at a time.

    `model` is the objective's loss module around the raw model (loss.SummedLoss(raw) for SFT), kept
    as `model.model`: the root of the FSDP tree, so its forward (which runs the
    embeddings, the layers and the output head) all-gathers the root's parameters once.
    fill (FSDP only): the base is still on the meta device and fill(part) loads a part of it
    (models.CheckpointLoader.fill): each decoder layer is loaded, then sharded, before the next
    one, and the root last, so no rank ever holds more of the base than its shards plus one layer
    (or the root). Every rank reads the checkpoint itself; nothing is sent between ranks.
    probe (FSDP only): the smallest batch the loss module takes (the objective's probe(); None: an
    SFT batch of one predicted token), run once so that FSDP knows its root."""
    if not ctx.active:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        raw = model.model  # the loss module's model: SummedLoss(raw)
        layers = getattr(getattr(raw, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"strategy 'fsdp' needs a transformers decoder (model.model.layers); "
                             f"{type(raw).__name__} has none: use strategy 'ddp'")
        mesh = init_device_mesh(ctx.device.type, (ctx.world,))  # explicit: gloo on CPU even with CUDA present
        for layer in layers:
            if fill is not None:
                fill(layer)
            _nf4_state_as_parameters(layer)
            fully_shard(layer, mesh=mesh)  # moves the layer to the device, keeps this rank's shards
        if fill is not None:
            fill(None)  # the rest: embeddings, final norm, output head, buffers
        _nf4_state_as_parameters(raw)
        fully_shard(model, mesh=mesh)
        _initialise_root(model, ctx.device, probe)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    _ddp_modules.add(ddp)
    return ddp


@torch.no_grad()
def _initialise_root(model: torch.nn.Module, device: torch.device, probe: dict[str, torch.Tensor] | None) -> None:
    """FSDP2 decides which module is the root in the first forward it sees: run one (the objective's
    probe batch, the loss module's smallest input) through the root, so that evaluation, which
    calls the raw model, can come first."""
    if probe is None:
        one = torch.zeros(1, 2, dtype=torch.long)
        probe = {"input_ids": one, "attention_mask": torch.ones_like(one), "labels": one}
    model(**{k: v.to(device) for k, v in probe.items()})
    model.reshard()


# NF4Linear's per-weight tensors (sizes proportional to the weight): packed codes, block absmax, DQ scales.
_NF4_SHARDED = ("weight", "weight_absmax", "weight_nested_absmax")


def _nf4_state_as_parameters(model: torch.nn.Module) -> None:
    """FSDP2 shards parameters, never buffers, and NF4 weights keep their 4-bit state in buffers:
    re-register the per-weight ones as frozen parameters (uint8 codes, uint8/float32 scales) so
    they are sharded like any frozen weight. An NF4Linear's: its packed weight and scales. An
    NF4Weight parametrization's (mixture-of-experts weights): the packed codes parametrize keeps
    (`parametrizations.<name>.original0`) and the NF4Weight's scales. Both are read by attribute
    name, so the forwards are unchanged; FSDP swaps in the all-gathered tensors around each
    layer's forward and backward. Only done under FSDP: a single process keeps the buffers (and
    their state_dict)."""
    from torch.nn.utils.parametrize import ParametrizationList

    from .nf4 import NF4Linear, NF4Weight

    for module in model.modules():
        if isinstance(module, NF4Linear):
            names = _NF4_SHARDED
        elif isinstance(module, NF4Weight):
            names = _NF4_SHARDED[1:]  # its packed codes live in the ParametrizationList holding it
        elif isinstance(module, ParametrizationList) and isinstance(module[0], NF4Weight):
            names = ("original0",)
        else:
            continue
        for name in names:
            tensor = module._buffers.get(name)
            if tensor is not None:
                del module._buffers[name]
                module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def _dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was wrapped by FSDP (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (an all-gather: every rank calls it, in the same order)."""
    return t.full_tensor() if _dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` split as the DTensor `like` is (this rank's part); `full` itself when `like` is a
    plain tensor. Collective under FSDP: every rank calls it, in the same order."""
    if not _dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


@contextlib.contextmanager
def full_trainable_weights(model: torch.nn.Module):
    """Inside: every trainable parameter of `model` is its full tensor (all-gathered on every
    rank), so code that reads weights (save_adapter, save_pretrained) sees what a single process
    sees. The shards are put back on exit. A no-op without FSDP."""
    swapped, full = [], {}  # full: one gathered tensor per parameter, also when tied (embeddings)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and _dtensor(p):
                if id(p) not in full:
                    full[id(p)] = torch.nn.Parameter(p.full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
                module._parameters[name] = full[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


@contextlib.contextmanager
def unsharded_root(model: torch.nn.Module):
    """Inside: the FSDP root's own parameters (embeddings, final norm, output head) are gathered,
    so the raw model's forward and generate() run outside SummedLoss.forward; each decoder layer
    gathers its own in its forward hooks. Collective: every rank must run the same computation
    inside. The root must have run one forward (FSDP's lazy initialisation). A no-op without FSDP."""
    if not sharded(model):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def exit_process(code: int) -> None:
    """End a torchrun worker without Python's interpreter teardown: nothing is left to free once
    train() has returned (teardown() freed the process group), and a worker that failed should
    not wait for anything on its way out. Outside torchrun: does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def all_reduce_sum(value: float, ctx: Context) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item()


def all_gather_objects(obj, ctx: Context) -> list:
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()
