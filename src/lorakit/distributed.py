"""Data-parallel training on torch.distributed, launched by torchrun (one process per device).

    torchrun --nproc_per_node N -m lorakit train CONFIG.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; lorakit joins the process group (NCCL on GPUs,
gloo on CPU), wraps the model in DistributedDataParallel (strategy "ddp") or shards it with FSDP2
(strategy "fsdp"), and gives each rank its slice of every global micro-batch. Only rank 0 writes
files. A rank that dies makes torchrun stop the others; a collective that waits longer than
train.dist_timeout_s fails instead of hanging.
"""

from __future__ import annotations

import os
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=target if cuda else None)
    return Context(rank, world, local_rank, target)


def teardown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing down while another still talks can hang
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: Context, strategy: str) -> torch.nn.Module:
    """DDP averages the gradients of the trainable parameters; FSDP2 shards every parameter
    (frozen base and adapters) across ranks, one decoder layer at a time."""
    if not ctx.active:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"strategy 'fsdp' needs a transformers decoder (model.model.layers); "
                             f"{type(model).__name__} has none: use strategy 'ddp'")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


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
