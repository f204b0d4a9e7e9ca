"""Predicted (lorakit.planner) vs measured peak memory of real training steps.

    .venv/bin/python bench/plan_vs_measured.py            # all configs, CPU (or CUDA when present)
    .venv/bin/python bench/plan_vs_measured.py --only 0,3 # a subset

Each config builds a tiny randomly initialized decoder from a transformers config, runs one warm-up
step (so AdamW's states exist, as in every later step), then measures the next full step
(forward, backward, optimizer step, zero_grad):

* CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), compared with the plan's
  `peak_allocated` (the runtime overhead is not part of that counter).
* CPU: PyTorch's CPU allocator, via the profiler. With profile_memory=True every allocation and free of
  the c10 CPU allocator is reported together with the running total of bytes allocated since profiling
  began (`total_allocated`); its maximum is the CPU analogue of max_memory_allocated, and it includes
  kernels' internal temporaries. The bytes already resident when profiling starts (parameters, buffers,
  optimizer states) are added. Peak RSS was rejected: glibc keeps freed pages, untouched pages of
  torch.empty are not resident, and the interpreter and libraries dominate for small models.

The step is lorakit's, as `lorakit train` runs it: lorakit.add_lora (fused update, fp32 adapters
around the frozen base) for LoRA, and lorakit.loss.model_loss (chunked cross-entropy where the
family supports it) as the loss; packed rows attend example by example (lorakit.attention, as
SummedLoss switches it on in the loop), planned unmasked on the families where that applies.
QLoRA is not measured here.

The DPO / ORPO rows run lorakit's preference step (training.objectives.PreferenceLoss: `batch` pairs,
2*batch rows, the first `prompt` tokens of every row carry no loss; DPO's reference forward with the
adapters disabled first) and are planned with objective dpo / orpo and answer_tokens = the scored tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass

import torch

from lorakit.attention import segment_attention
from lorakit.loss import model_loss
from lorakit.planner import arch_from_config, plan


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # llama | qwen2 | mixtral | phi3 | gemma2
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    method: str  # full | lora
    batch: int
    seq: int
    ckpt: bool = False
    dtype: str = "bf16"
    targets: tuple[str, ...] | str | None = None
    rank: int = 8
    tied: bool = False
    dropout: float = 0.0
    objective: str = "sft"  # sft | dpo | orpo (batch: pairs)
    prompt: int = 0  # preference: tokens of each row before the answer (no loss)
    dora: bool = False  # DoRA (lora.dora) on the targeted linears
    rows: str = "full"  # "padded": the last row half padding (an attention mask); "packed": 4 examples per row


CASES = [
    Case("llama-12M full", "llama", 256, 688, 4, 8, 4, 8000, "full", 2, 128),
    Case("llama-12M full fp32", "llama", 256, 688, 4, 8, 4, 8000, "full", 2, 128, dtype="fp32"),
    Case("llama-30M lora qv", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 256),
    Case("llama-30M lora qv ckpt", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 256, ckpt=True),
    Case("llama-30M lora all b4", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 4, 128, targets="all-linear"),
    Case("llama-30M full ckpt", "llama", 512, 1376, 6, 8, 4, 16000, "full", 2, 256, ckpt=True),
    Case("llama-110M lora qv s512", "llama", 768, 2048, 12, 12, 4, 32000, "lora", 1, 512, tied=True),
    Case("llama-110M lora all ckpt", "llama", 768, 2048, 12, 12, 4, 32000, "lora", 1, 512, ckpt=True,
         targets="all-linear", tied=True),
    Case("llama-110M full", "llama", 768, 2048, 12, 12, 4, 32000, "full", 1, 256, tied=True),
    Case("qwen2-20M lora all", "qwen2", 384, 1024, 6, 6, 2, 16000, "lora", 2, 256, targets="all-linear"),
    Case("phi3-25M lora qkv", "phi3", 512, 1376, 6, 8, 8, 8000, "lora", 2, 256, targets=("qkv_proj",)),
    Case("llama-30M lora qv r64 fp32", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 256, dtype="fp32",
         rank=64),
    # Small vocabulary: the layers, not the logits, set the peak.
    Case("llama-20M-v1k lora qv s512", "llama", 512, 1376, 6, 8, 4, 1000, "lora", 2, 512),
    Case("llama-20M-v1k full ckpt", "llama", 512, 1376, 6, 8, 4, 1000, "full", 2, 512, ckpt=True),
    # Gemma 2: eager attention with soft-capping (s^2 probabilities), four norms, tied embeddings
    Case("gemma2-15M lora qv eager", "gemma2", 256, 768, 4, 4, 2, 8000, "lora", 2, 256, tied=True),
    # Preference steps: B pairs are 2B rows; the loss scores only the answers' tokens (n_a)
    Case("llama-30M dpo lora qv", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 256, objective="dpo",
         prompt=64),
    Case("llama-30M dpo lora all fp32", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 128, dtype="fp32",
         targets="all-linear", objective="dpo", prompt=32),
    Case("llama-12M orpo full", "llama", 256, 688, 4, 8, 4, 8000, "full", 2, 128, objective="orpo", prompt=32),
    # SmolLM2-135M's shapes, as bench/dpo_step.py trains it (4 pairs, 44 tokens, r=16 on every linear)
    Case("smollm2-135m dpo lora all fp32", "llama", 576, 1536, 30, 9, 3, 49152, "lora", 4, 44, dtype="fp32",
         targets="all-linear", rank=16, tied=True, objective="dpo", prompt=34),
    # DoRA: a magnitude per output, the (T, out) product it scales saved, the weight norm's fp32 buffers
    Case("llama-30M dora all", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 256, targets="all-linear",
         dora=True),
    Case("llama-30M lora all padded", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 4, 256, targets="all-linear",
         rows="padded"),
    Case("smollm2-135m lora all fp32 packed", "llama", 576, 1536, 30, 9, 3, 49152, "lora", 1, 1024, dtype="fp32",
         targets="all-linear", rank=16, tied=True, dropout=0.05, rows="packed"),
    # DoRA with dropout: W multiplies the dropped input too, which is kept instead of the input
    Case("llama-30M dora all dropout", "llama", 512, 1376, 6, 8, 4, 16000, "lora", 2, 256, targets="all-linear",
         dora=True, dropout=0.05),
]


def build_config(c: Case):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mixtral": transformers.MixtralConfig, "phi3": transformers.Phi3Config,
           "gemma2": transformers.Gemma2Config}[c.family]
    kw = dict(hidden_size=c.hidden, intermediate_size=c.inter, num_hidden_layers=c.layers,
              num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, vocab_size=c.vocab,
              tie_word_embeddings=c.tied, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    if c.family == "gemma2":
        kw["head_dim"] = 2 * c.hidden // c.heads  # Gemma 2's head_dim is independent of hidden_size
    return cls(**kw)


def model_under_training(c: Case, dtype: torch.dtype, device: str):
    """The model as trained: full (all parameters train) or LoRA via lorakit.add_lora."""
    from transformers import AutoModelForCausalLM

    attention = "eager" if c.family == "gemma2" else "sdpa"  # Gemma 2 soft-caps: eager attention
    model = AutoModelForCausalLM.from_config(build_config(c), attn_implementation=attention).to(dtype).to(device)
    if c.method == "lora":
        import lorakit

        targets = list(c.targets) if isinstance(c.targets, tuple) else c.targets  # None: q_proj, v_proj
        lorakit.add_lora(model, lorakit.LoraConfig(r=c.rank, alpha=16, dropout=c.dropout, targets=targets,
                                                    dora=c.dora))
    if c.ckpt:
        model.gradient_checkpointing_enable()
        if c.method == "lora":
            model.enable_input_require_grads()  # as lorakit.training.setup.prepare_model does
    model.train()
    return model


def preference_batch(c: Case, device: str) -> dict[str, torch.Tensor]:
    """c.batch pairs as 2*c.batch rows; the first c.prompt tokens of each row carry no loss."""
    ids = torch.randint(3, c.vocab, (2 * c.batch, c.seq), device=device)
    labels = ids.clone()
    labels[:, :c.prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def sft_rows(c: Case, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SFT batch: full rows; the last row half padding (attention_mask, no loss there); or rows of
    four packed examples (position_ids restarting at each, as data.pack makes them)."""
    if c.rows == "padded":
        mask = torch.ones_like(ids)
        mask[-1, c.seq // 2:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if c.rows == "packed":
        lengths = [c.seq // 8, c.seq // 4, c.seq // 8, c.seq - c.seq // 2]
        positions = torch.cat([torch.arange(n) for n in lengths]).repeat(c.batch, 1).to(ids.device)
        return {"input_ids": ids, "labels": ids, "position_ids": positions, "use_cache": False}
    return {"input_ids": ids, "labels": ids}


def answer_tokens(c: Case) -> int | None:
    """n_a: the positions whose next label is scored (sequence_logps), None for SFT."""
    return 2 * c.batch * (c.seq - max(c.prompt, 1)) if c.objective != "sft" else None


def measure(c: Case, device: str) -> int:
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[c.dtype]
    model = model_under_training(c, dtype, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, c.vocab, (c.batch, c.seq), device=device)
    if c.objective != "sft":
        from lorakit.training.objectives import dpo, orpo

        batch = preference_batch(c, device)
        ids = batch["input_ids"]
        preference_loss = (dpo() if c.objective == "dpo" else orpo()).loss(model)

    rows = sft_rows(c, ids)

    def loss_of_step():
        if c.objective != "sft":
            return preference_loss(**batch) / c.batch  # the mean loss per pair, as the loop divides
        with segment_attention(model) if c.rows == "packed" else contextlib.nullcontext():
            return model_loss(model, **rows)  # lorakit's loss: chunked where supported

    def step():
        loss = loss_of_step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states now exist
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    from common import allocator_peak, resident_bytes  # bench/common.py, beside this script

    resident = resident_bytes(*model.parameters(), *model.buffers(), *states, ids)

    return resident + allocator_peak(step)


def predict(c: Case, device: str) -> int:
    arch = arch_from_config(build_config(c).to_dict(), name=c.name)
    segments = c.rows == "packed" and arch.segment_attention and not c.ckpt
    result = plan(arch, method=c.method, rank=c.rank, targets=c.targets, batch_size=c.batch, seq_len=c.seq,
                  grad_checkpointing=c.ckpt, dtype=c.dtype, device=device, recommend=False,
                  objective=c.objective, answer_tokens=answer_tokens(c), dora=c.dora, lora_dropout=c.dropout,
                  masked_attention=c.rows == "padded" or (c.rows == "packed" and not segments),
                  segment_attention=segments)
    return result.peak_allocated, result.peak_phase


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case indices")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(2)
    cases = [CASES[int(i)] for i in args.only.split(",")] if args.only else CASES
    print(f"device: {device} ({'max_memory_allocated' if device == 'cuda' else 'CPU allocator via profiler'})")
    print(f"{'#':>2} {'config':28s} {'batch x seq':>11s} {'predicted':>10s} {'measured':>10s} {'ratio':>6s}  "
          f"peak moment (predicted)")
    worst = 0.0
    for i, c in enumerate(cases):
        t0 = time.time()
        predicted, phase = predict(c, device)
        measured = measure(c, device)
        ratio = predicted / measured
        worst = max(worst, abs(ratio - 1))
        print(f"{CASES.index(c):2d} {c.name:28s} {f'{c.batch} x {c.seq}':>11s} {predicted / 2**20:7.1f} MiB "
              f"{measured / 2**20:7.1f} MiB {ratio:6.3f}  {phase} [{time.time() - t0:.0f}s]", flush=True)
    print(f"worst deviation: {100 * worst:.1f}%")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
