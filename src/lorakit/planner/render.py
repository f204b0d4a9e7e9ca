"""A plan as text: the breakdown `lorakit plan` prints, and the one line `lorakit train` logs."""

from __future__ import annotations

from dataclasses import replace

from .memory import GPUS, GiB, Plan, fits, pissa_init_flops

FAST_NITER = 4  # the pissa_niter the PiSSA line quotes as the cheaper option (peft's docs use 4 to 16)

LABELS = {
    "base_weights": "base weights",
    "quant_constants": "quantization constants",
    "adapter_weights": "adapter weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_and_loss": "logits and loss",
    "transient": "transient buffers",
    "runtime_overhead": "runtime overhead",
}


def _gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB"


def render_plan(plan_: Plan) -> str:
    """A human-readable breakdown, peak, GPU fit table and recommendation."""
    c, a = plan_.config, plan_.arch
    lines = [
        f"lorakit plan: {a.name}  method={c.method} dtype={c.dtype} optimizer={c.optimizer} "
        f"batch={c.batch_size} seq={c.seq_len} checkpointing={'on' if c.grad_checkpointing else 'off'} "
        f"gpus={c.n_gpus}" + ("" if c.method == "full" else f" rank={c.rank}")
        + (f" objective={c.objective} (batch in pairs)" if c.preference else ""),
        f"parameters: {plan_.total_params:,} total, {plan_.trainable_params:,} trainable "
        f"({100 * plan_.trainable_params / plan_.total_params:.3f}%)"
        + (f", {plan_.quantized_params:,} in NF4" if plan_.quantized_params else ""),
        "",
        "component                     size (all GPUs)",
    ]
    for key, value in plan_.components.items():
        lines.append(f"  {LABELS[key]:26s}{_gib(value)}")
    lines.append(f"  activations w/o checkpoint  {_gib(plan_.activations_without_checkpointing)}")
    lines.append(f"  activations w/ checkpoint   {_gib(plan_.activations_with_checkpointing)}")
    lines += ["", "moment of the step            allocated per GPU"]
    for key, value in plan_.phases.items():
        mark = "  <- peak" if key == plan_.peak_phase else ""
        lines.append(f"  {key:26s}{_gib(value)}{mark}")
    lines += [
        (f"predicted peak per GPU: {plan_.peak / GiB:.2f} GiB "
         f"({plan_.peak_allocated / GiB:.2f} allocated + {plan_.runtime_overhead / GiB:.2f} runtime overhead)"),
        *([pissa_line(plan_)] if plan_.init_svds else []),
        "",
        "fits on     1 GPU  2 GPUs  4 GPUs  8 GPUs   (FSDP sharding for >1)",
    ]
    for gib, examples in GPUS.items():
        marks = "".join(f"{'yes' if fits(plan_, gib, k) else 'no':>7s} " for k in (1, 2, 4, 8))
        lines.append(f"  {gib:3d} GiB {marks}  {examples}")
    lines += [f"note: {note}" for note in plan_.notes]
    if plan_.recommendation is not None:
        r = plan_.recommendation
        lines += ["", f"recommendation: {r.method} ({r.budget_gib:g} GiB per GPU budget): {r.reason}"]
    return "\n".join(lines)


def pissa_line(plan_: Plan) -> str:
    """The start-up line of init "pissa": "PiSSA init: N SVDs (full | randomized, niter K) of W (out x in):
    c x OxI, ...; about X GFLOP[ (lora.pissa_niter=4, a randomized SVD: about Z)]; Y MiB of float32 working
    memory (where)", the randomized option quoted when the full SVD is planned (memory.pissa_init_*)."""
    c = plan_.config
    kind = "full" if c.pissa_niter is None else f"randomized, niter {c.pissa_niter}"
    count = sum(n for _, _, n in plan_.init_svds)
    shapes = ", ".join(f"{n} x {o}x{i}" for o, i, n in plan_.init_svds)
    faster = ""
    if c.pissa_niter is None:  # the option that makes it cheaper, with its number
        fast = pissa_init_flops(plan_.arch, replace(c, pissa_niter=FAST_NITER))
        faster = f" (lora.pissa_niter={FAST_NITER}, a randomized SVD: about {fast / 1e9:.1f})"
    where = ("on the CPU in lorakit train, before the model moves to the device" if c.device == "cuda"
             else "the start-up moment above")
    return (f"PiSSA init: {count} SVDs ({kind}) of W (out x in): {shapes}; about {plan_.init_flops / 1e9:.1f} "
            f"GFLOP{faster}; {plan_.init_bytes / 2**20:.1f} MiB of float32 working memory ({where})")


def memory_plan_line(plan_: Plan, available: int, device: str) -> str:
    """The line `lorakit train` logs before its first step (and `lorakit plan CONFIG` prints):
    "memory plan: predicted peak X GiB (batch B[ pairs] x S tokens[, sharded over N ranks]) of Y GiB
    available on DEVICE" (pairs: objective dpo / orpo), with `available` in bytes (recommend.available_memory)."""
    c = plan_.config
    sharding = f", sharded over {c.n_gpus} ranks" if c.n_gpus > 1 else ""
    batch = f"{c.batch_size} pairs" if c.preference else f"{c.batch_size}"
    return (f"memory plan: predicted peak {plan_.peak / GiB:.2f} GiB (batch {batch} x "
            f"{c.seq_len} tokens{sharding}) of {available / GiB:.1f} GiB available on {device}")
