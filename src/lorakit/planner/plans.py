"""The planner's entry points: `plan` for a model and explicit settings (what `lorakit plan --model`
runs), `plan_run` for a training run's RunConfig (what `lorakit plan CONFIG.yaml` and `lorakit
train` run), and `arch_for_run`, the architecture a run config's model.path names.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import MAX_LENGTH_AUTO_CAP, RunConfig
from .architecture import Architecture
from .memory import Plan, PlanConfig, predict
from .presets import resolve_model
from .recommend import budget_problem, recommend_method


def plan(model: str | Architecture | dict, config: PlanConfig | None = None, *,
         budget_gib: float | None = None, domain_shift: bool = False, recommend: bool = True,
         **overrides) -> Plan:
    """Predict the memory of one training step of `model` under `config` (or PlanConfig(**overrides)).

    model: a preset name, a local model directory or config.json, a hub id, a config dict or an
    Architecture. recommend: also recommend full / LoRA / QLoRA for `budget_gib` per GPU.
    """
    config = replace(config or PlanConfig(), **overrides)
    config.validate()
    problem = budget_problem(budget_gib)
    if problem:
        raise ValueError(problem)
    result = predict(resolve_model(model), config)
    if recommend:
        result = replace(result, recommendation=recommend_method(result, budget_gib, domain_shift))
    return result


def plan_config(config: RunConfig, device: str = "cuda", n_gpus: int = 1, optimizer: str = "adamw",
                arch: Architecture | None = None) -> PlanConfig:
    """The PlanConfig of a run: the run config's keys in the planner's fields.

        method                          -> method
        lora.r, lora.targets, lora.dropout -> rank, targets, lora_dropout
        lora.dora, lora.target_parameters  -> dora, target_parameters
        lora.init, lora.pissa_niter     -> init, pissa_niter (PiSSA's SVDs at start-up)
        train.batch_size                -> batch_size (the micro-batch per rank)
        data.max_length                 -> seq_len ("auto": MAX_LENGTH_AUTO_CAP, the most it can be)
        train.gradient_checkpointing    -> grad_checkpointing
        model.dtype                     -> dtype
        objective                       -> objective (dpo / orpo: batch_size pairs, 2 * batch_size sequences;
                                           every token of a pair's answers scored: answer_tokens None)
        data.packing, batch_size > 1, dpo / orpo -> masked_attention (rows padded to the longest, or
                                           packed: the batch carries an attention mask)
        data.padding_free               -> batch_size 1 and seq_len batch_size * seq_len (the micro-batch
                                           is one row; its block-diagonal mask covers the whole row)
        data.packing / padding_free on `arch` with segment_attention, without gradient checkpointing
                                        or compile -> segment_attention instead of masked_attention
                                           (lorakit.attention: each example attends alone; without
                                           `arch`, masked)

    device ("cuda" or "cpu") and n_gpus (ranks sharding the model with FSDP; 1 for one process or
    DDP, which replicates it) are where the run happens; optimizer is the planner's (lorakit train
    uses torch's AdamW: "adamw"). lora.targets None plans q_proj and v_proj.
    """
    seq_len = MAX_LENGTH_AUTO_CAP if config.data.max_length == "auto" else config.data.max_length
    batch_size = config.train.batch_size
    if config.data.padding_free:
        batch_size, seq_len = 1, batch_size * seq_len
    packed_rows = config.data.packing or config.data.padding_free
    segments = (packed_rows and arch is not None and arch.segment_attention and arch.attention == "sdpa"
                and not config.train.gradient_checkpointing and not config.train.compile)
    return PlanConfig(method=config.method, rank=config.lora.r, targets=config.lora.targets,
                      batch_size=batch_size, seq_len=seq_len,
                      grad_checkpointing=config.train.gradient_checkpointing, dtype=config.model.dtype,
                      lora_dropout=config.lora.dropout, device=device, n_gpus=n_gpus, optimizer=optimizer,
                      objective=config.objective, dora=config.lora.dora,
                      target_parameters=config.lora.target_parameters, init=config.lora.init,
                      pissa_niter=config.lora.pissa_niter,
                      masked_attention=not segments and (packed_rows or config.train.batch_size > 1
                                                         or config.objective != "sft"),
                      segment_attention=segments)


def plan_run(config: RunConfig, arch: Architecture | str | dict, device: str = "cuda", n_gpus: int = 1, *,
             optimizer: str = "adamw", budget_gib: float | None = None, domain_shift: bool = False,
             recommend: bool = False) -> Plan:
    """The memory plan of the run `config` describes, on `arch` (see plan_config for the mapping;
    `arch`: an Architecture, or anything `plan` takes as its model). `lorakit train` logs this plan
    before its first step; `lorakit plan CONFIG.yaml` prints it. data.max_length "auto" is planned
    at its cap, MAX_LENGTH_AUTO_CAP tokens (the real length is the longest training example, known
    only from the data), and the plan's notes say so."""
    arch = resolve_model(arch)
    result = plan(arch, plan_config(config, device, n_gpus, optimizer, arch), budget_gib=budget_gib,
                  domain_shift=domain_shift, recommend=recommend)
    if config.data.max_length == "auto":
        note = (f"data.max_length is 'auto' (the longest training example, known only from the data): planned "
                f"at its cap, {MAX_LENGTH_AUTO_CAP} tokens per sequence; a shorter longest example needs less")
        result = replace(result, notes=(*result.notes, note))
    return result


def arch_for_run(config: RunConfig) -> Architecture:
    """The architecture of the run's model.path.

    None or the default model's name: SmolLM2-135M-Instruct's shapes (the smollm2-135m preset: the
    converted default model has exactly these, a test pins it). A local model directory: its
    config.json (the keys transformers writes and train's model is built from). Anything else
    the planner knows: a preset name, a config.json, a hub id (resolve_model).
    """
    from ..models import DEFAULT_MODEL

    path = config.model.path
    if path is None or path == DEFAULT_MODEL:
        return replace(resolve_model(DEFAULT_MODEL), name=DEFAULT_MODEL)
    return resolve_model(str(Path(path).expanduser()) if path.startswith("~") else path)


def run_device(config: RunConfig) -> str:
    """"cuda" or "cpu": where `lorakit train` would run `config` on this machine (train.device
    "auto" is CUDA when torch sees a CUDA device, as distributed.setup decides)."""
    import torch

    if config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"
