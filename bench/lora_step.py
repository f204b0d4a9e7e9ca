"""Training-step time, tokens/s and peak memory: lorakit vs peft (+ bitsandbytes) vs full fine-tuning.

    .venv/bin/python bench/lora_step.py --suite lora    # lorakit LoRA vs peft LoRA vs full fine-tuning
    .venv/bin/python bench/lora_step.py --suite qlora   # lorakit QLoRA vs peft + bitsandbytes QLoRA
    .venv/bin/python bench/lora_step.py --suite levers  # each lorakit lever alone (+ nn.Dropout, dropout off)
    .venv/bin/python bench/lora_step.py --suite adamw   # AdamW foreach vs fused, optimizer step only
    .venv/bin/python bench/lora_step.py --suite qlora --memory-only   # peak memory alone (no timing)
    .venv/bin/python bench/lora_step.py --suite qlora --bound   # + lorakit LoRA on the float32 base

--bound (qlora) also times lorakit's LoRA step on the unquantized float32 base, against the same peer:
a QLoRA step does all of its work (the same products, on the dequantized weight) and dequantizes
besides, so its time is a lower bound for any QLoRA step of lorakit's design.

Same model (SmolLM2-135M-Instruct, float32), data (seeded random tokens, batch 8 x 128), adapter
config (r=16, alpha=32, dropout 0.05, all linear layers but the head) and optimizer (AdamW,
foreach) for every contender. A step is forward, loss, backward, optimizer step, zero_grad.
The contenders are timed interleaved in one process (see common.py: the machine is shared, so
only ratios measured side by side mean anything), with each one's matmul floor (suites lora and
qlora: common.matmul_replay, its matrix products alone; lorakit's floor over the peer's step is the
least time ratio those products allow on this BLAS), then each one's peak memory is measured on one
more step with the profiler's allocator accounting (also common.py). The last line is JSON.

lorakit's step is what its training loop runs: LoraLinear's fused update (fused.py) and the loss
from the last hidden states in chunks (loss.model_loss). peft's and the full fine-tuning step
are what their users run: `model(input_ids, labels=...).loss`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402


def adamw(model, fused: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, foreach=not fused, fused=fused or None)


def lorakit_model(quantized: bool = False, fused: bool = True, torch_dropout: bool = False, dropout: float = C.DROPOUT):
    """torch_dropout: the adapters' dropout is nn.Dropout (a Bernoulli draw per element and a bool
    mask, as peft's) instead of lorakit's (dropout.py); only meaningful with fused=False."""
    import lorakit
    from lorakit.layer import LoraLinear
    from lorakit.nf4 import quantize_linears

    model = C.base_model()
    if quantized:  # NF4 with double quantization, blocksize 64, float32 compute: QLoRA's recipe
        quantize_linears(model, torch.float32, skip={"lm_head"})
    lorakit.add_lora(model, lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, dropout=dropout, targets="all-linear"))
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused = fused
            if torch_dropout:
                module.lora_dropout["default"] = torch.nn.Dropout(C.DROPOUT).train()
    return model


def peft_model(quantized: bool = False):
    from peft import LoraConfig, get_peft_model

    if quantized:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from lorakit.models import default_model_dir

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(default_model_dir(), quantization_config=bnb,
                                                     dtype=torch.float32, device_map="cpu")
        model.train()
    else:
        model = C.base_model()
    config = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, lora_dropout=C.DROPOUT, target_modules="all-linear")
    return get_peft_model(model, config)


class Trainer:
    """One contender: a model, its optimizer, and how it computes the loss."""

    def __init__(self, name, model, ids, chunked_loss: bool, fused_adamw: bool = False):
        from lorakit.loss import model_loss

        self.name, self.model, self.ids = name, model, ids
        self.opt = adamw(model, fused_adamw)
        if chunked_loss:
            self.loss = lambda: model_loss(model, input_ids=ids, labels=ids)
        else:
            self.loss = lambda: model(input_ids=ids, labels=ids).loss

    def step(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def peak_memory(self) -> int:
        """Resident model, optimizer state and batch, plus the allocator's peak during one step."""
        resident = C.resident_bytes(*C.model_tensors(self.model), *C.optimizer_tensors(self.opt), self.ids)
        return resident + C.allocator_peak(self.step)


QLORA_BOUND = "lorakit LoRA, float32 base"


def contenders(suite: str, ids, bound: bool = False) -> list[Trainer]:
    if suite == "lora":
        return [Trainer("lorakit LoRA", lorakit_model(), ids, chunked_loss=True),
                Trainer("peft LoRA", peft_model(), ids, chunked_loss=False),
                Trainer("full fine-tuning", C.base_model(), ids, chunked_loss=False)]
    if suite == "qlora":
        trainers = [Trainer("lorakit QLoRA", lorakit_model(quantized=True), ids, chunked_loss=True),
                    Trainer("peft+bnb QLoRA", peft_model(quantized=True), ids, chunked_loss=False)]
        if bound:
            trainers.append(Trainer(QLORA_BOUND, lorakit_model(), ids, chunked_loss=True))
        return trainers
    if suite == "levers":
        return [Trainer("plain", lorakit_model(fused=False), ids, chunked_loss=False),
                Trainer("plain, nn.Dropout", lorakit_model(fused=False, torch_dropout=True), ids, chunked_loss=False),
                Trainer("fused update", lorakit_model(fused=True), ids, chunked_loss=False),
                Trainer("chunked loss", lorakit_model(fused=False), ids, chunked_loss=True),
                Trainer("both", lorakit_model(fused=True), ids, chunked_loss=True),
                Trainer("both, dropout 0", lorakit_model(fused=True, dropout=0.0), ids, chunked_loss=True)]
    raise ValueError(f"unknown suite {suite!r}")


def run_memory(trainers: list[Trainer]) -> None:
    """Peak memory only (no timing: the allocator's accounting does not depend on the machine's load)."""
    peaks = {t.name: t.peak_memory() for t in trainers}
    ref = trainers[1] if len(trainers) > 1 else trainers[0]
    print(C.table(["step", "peak memory", f"memory / {ref.name}"],
                  [[n, C.mib(p), f"{p / peaks[ref.name]:.3f}"] for n, p in peaks.items()]))
    print(json.dumps({"peak_memory_ratio": round(peaks[trainers[0].name] / peaks[ref.name], 3),
                      "peak_memory_mib": {n: round(p / 2**20, 1) for n, p in peaks.items()}}))


def run_steps(suite: str, reps: int, memory: bool, memory_only: bool = False, bound: bool = False) -> None:
    vocab = C.base_model().config.vocab_size
    ids = C.token_batch(vocab)
    trainers = contenders(suite, ids, bound)
    losses = {t.name: t.step().item() for t in trainers}  # also the warm-up step (optimizer states exist)
    print("first-step loss: " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))
    if memory_only:
        run_memory(trainers)
        return
    timed = [C.Contender(t.name, t.step) for t in trainers]
    if suite == "levers":
        C.time_alternating(timed, reps=reps, warmup=0)
        floors = {}
    else:  # lora, qlora: each step's matrix products alone (its matmul floor), interleaved with the steps
        floors = C.time_with_floors(timed, reps)
    peaks = {t.name: t.peak_memory() for t in trainers} if memory else {}
    ref = timed[1] if suite in ("lora", "qlora") else timed[0]
    tokens = ids.numel()
    rows = []
    for c in timed:
        row = [c.name, f"{c.median:.2f} s", f"{tokens / c.median:,.0f}", f"{c.median / ref.median:.2f}"]
        if floors:
            row += [f"{floors[c.name]:.2f} s", f"{floors[c.name] / ref.median:.2f}"]
        if memory:
            row += [C.mib(peaks[c.name]), f"{peaks[c.name] / peaks[ref.name]:.2f}"]
        rows.append(row)
    header = ["step", "median time", "tokens/s", f"time / {ref.name}"]
    if floors:
        header += ["matmul floor", f"floor / {ref.name}"]
    if memory:
        header += ["peak memory", f"memory / {ref.name}"]
    print(f"\n{suite}: SmolLM2-135M fp32, batch {C.BATCH} x {C.SEQ}, r={C.RANK}, dropout {C.DROPOUT}, "
          f"{reps} interleaved reps, {torch.get_num_threads()} threads")
    print(C.table(header, rows))
    if suite == "lora":
        print(f"lorakit LoRA / full fine-tuning step time: {timed[0].median / timed[2].median:.2f}")
    result = {"suite": suite, "reps": reps, "time_ratio": round(timed[0].median / ref.median, 3),
              "times_s": {c.name: [round(t, 4) for t in c.times] for c in timed}}
    if bound:
        result["bound_time_ratio"] = round(next(c for c in timed if c.name == QLORA_BOUND).median / ref.median, 3)
    if floors:
        result["floor_ratio"] = round(floors[timed[0].name] / ref.median, 3)
        result["matmul_floor_s"] = {n: round(f, 4) for n, f in floors.items()}
    if memory:
        result["peak_memory_ratio"] = round(peaks[timed[0].name] / peaks[ref.name], 3)
    print(json.dumps(result))


def run_adamw(reps: int) -> None:
    """The optimizer step alone, foreach vs fused, on the LoRA adapters and on the full model."""
    rows = []
    for what, make in (("LoRA adapters (r=16, all linear)", lambda: lorakit_model()),
                       ("full model (134.5M)", C.base_model)):
        model = make()
        opts = {}
        for fused in (False, True):
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opts[fused] = torch.optim.AdamW(params, lr=1e-4, foreach=not fused, fused=fused or None)
        timed = [C.Contender("foreach", opts[False].step), C.Contender("fused", opts[True].step)]
        C.time_alternating(timed, reps=reps, warmup=1, verbose=False)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append([what, f"{n / 1e6:.2f}M", f"{timed[0].median * 1e3:.1f} ms", f"{timed[1].median * 1e3:.1f} ms",
                     f"{timed[1].median / timed[0].median:.2f}"])
    print(f"\nAdamW step alone, {reps} interleaved reps, {torch.get_num_threads()} threads")
    print(C.table(["parameters", "count", "foreach", "fused", "fused / foreach"], rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["lora", "qlora", "levers", "adamw"], default="lora")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory step")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the profiled peak-memory step (load-independent; no timing)")
    parser.add_argument("--bound", action="store_true",
                        help=f"suite qlora: also time {QLORA_BOUND!r}, a lower bound for lorakit's QLoRA step")
    args = parser.parse_args(argv)
    if args.bound and args.suite != "qlora":
        parser.error(f"--bound applies to --suite qlora only, not {args.suite!r}")
    C.setup(args.threads)
    if args.suite == "adamw":
        run_adamw(args.reps * 4)
    else:
        run_steps(args.suite, args.reps, not args.no_memory, args.memory_only, args.bound)
    return 0


if __name__ == "__main__":
    sys.exit(main())
