"""End to end: `lorakit train` against trl's SFTTrainer + peft on variable-length instruction data.

    .venv/bin/python bench/sft_vs_trl.py --reps 2            # LoRA; the last line printed is JSON
    .venv/bin/python bench/sft_vs_trl.py --reps 2 --qlora    # QLoRA: lorakit qlora vs trl + peft + bitsandbytes
    .venv/bin/python bench/sft_vs_trl.py --steps 2 --examples 2 --max-length 128 --heldout 4 --reps 1   # smoke
    .venv/bin/python bench/sft_vs_trl.py --order own     # trl shuffles the examples its own way (issue 15's gap)

What every contender gets (issue 20, item 1):
- the same model: SmolLM2-135M-Instruct, float32 (lorakit.models.load_model; QLoRA: every linear but
  the head in NF4 with double quantization, float32 compute: lorakit's NF4Linear, bitsandbytes'
  Linear4bit; the two are bit-exact);
- the same data: seeded prompt/completion records (copy, reverse or sort a list of words), whose
  lengths follow a log-normal law, median ~100 tokens with a tail to max length (at most
  --max-length, so that nothing is truncated and every mode trains on the same tokens), written as
  JSONL to a temporary directory; prompts end with a newline so that tokenizing prompt and completion
  apart (lorakit) or together (trl) gives the same ids;
- the same work: --steps optimizer steps of --examples examples (one epoch over steps x examples
  records), r=16 alpha=32 dropout 0.05 (--dropout) on all linear layers but the head, AdamW at a constant
  --lr with no warm-up, weight decay 0, gradient clipping at 1.0, seed 0, no gradient checkpointing
  (--gradient-checkpointing turns it on for everyone; trl's own default is on);
- the same batches (--order lorakit, the default): trl padded and trl padding-free read the records
  in lorakit's epoch order (data.epoch_order of seed 0) without shuffling, so their 4-example
  batches are lorakit padded's (and lorakit padding-free's), step for step. With --order own trl
  shuffles them with its sampler (seed 0), and the held-out loss then measures the order more than
  the library: at 10 steps of 5e-4 it moved by 0.31 (issue 15: lorakit padded 3.2793, trl padded
  2.9697; trl fed lorakit's order, dropout 0: 3.2778 for both, the same to 2e-6). Over orders (trl,
  the same initial adapter, dropout 0): lorakit's epoch_order of seeds 0-3 gives 3.28, 3.10, 3.01,
  3.06, trl's sampler of data seeds 0-3 2.96, 3.05, 3.28, 2.99: trl's seed 0 was a lucky order.
  lorakit grouped and the packed modes batch differently whatever the order;
- packed modes (lorakit `data.packing`, trl `packing=True`) batch rows, not examples: the records are
  packed into R rows of max length by each library, and a step takes max(1, R // steps) rows for
  R // that steps, one epoch over the same records (the steps column says how many were taken).
  Each library orders its rows its own way (lorakit: data.epoch_order of train.seed; trl: its
  sampler of seed), so the batches differ and so do the losses along the way; after the epoch both
  have seen every record once, which is what the held-out loss compares.

Contenders (each a fresh subprocess, so that its peak RSS is its own; lorakit's get THP_MEM_ALLOC_ENABLE=1,
as a `lorakit train` process has it: lorakit sets it when imported before torch):
    lorakit padded      lorakit's default: right-padded batches
    lorakit grouped     data.group_by_length: batches of similar length (exact, less padding)
    lorakit packed      data.packing: whole examples in rows, block-diagonal attention (exact)
    lorakit padding-free  data.padding_free: each batch's examples in one row, block-diagonal
                        attention (exact; the batches and steps of padded, as trl padding-free)
    trl padded          SFTTrainer + peft_config, right-padded batches
    trl padding-free    padding_free=True: the batch flattened into one row with position ids;
                        trl documents it for FlashAttention, and on CPU SDPA transformers derives
                        the block-diagonal causal mask from the position ids (exact as well)
    trl packed          packing=True (packing_strategy "bfd", which turns padding-free on)
  and, named only (not in the default list):
    lorakit padding-free without dropout   the same at dropout 0 whatever --dropout says: every
                        operation of it is also in lorakit padding-free's run, so its tokens/s bound
                        those of any dropout of lorakit's design (it trains another model: its
                        held-out loss is not the others')

Reported per contender: supervised tokens per second of training (the completion tokens the loss
counts, over lorakit's train_seconds, and over trl's train_runtime), peak RSS of its process, the
final training loss, and the held-out loss of the saved adapter, computed by one function here
(heldout_loss) for every contender: the base (its NF4 round trip for QLoRA) with the adapter loaded
by peft, mean cross-entropy per completion token over --heldout records from another seed.
Repetitions are interleaved (contender order rotated each repetition); medians, min-max spread,
and ratios against trl's best exact mode (the fastest of trl padded / padding-free / packed).
Peak memory on the planner's basis (the allocator's) is not measured here: the profiler it needs
would slow every contender's whole run; bench/lora_step.py measures it for one step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

LORAKIT = ("lorakit padded", "lorakit grouped", "lorakit packed", "lorakit padding-free")
TRL = ("trl padded", "trl padding-free", "trl packed")
BOUND = "lorakit padding-free without dropout"
LORAKIT_RUNS = LORAKIT + (BOUND,)  # every contender that runs lorakit train
CONTENDERS = LORAKIT_RUNS + TRL
WORDS = ("apple river stone cloud green music paper light tiger window silver garden orange winter "
         "candle bridge forest mirror rocket summer violet planet castle ocean pencil thunder "
         "lemon marble spider rabbit desert harbor meadow falcon copper velvet island jacket").split()
TASKS = {"Copy": lambda w: w, "Reverse": lambda w: w[::-1], "Sort": sorted}


# --- data -----------------------------------------------------------------------------------------

def record_length(rng: random.Random, max_length: int) -> int:
    """Tokens of one record: log-normal, median 100, sigma 0.75 (1% above ~570, a tail to ~1,000),
    within [24, max_length]."""
    return max(24, min(max_length, round(math.exp(rng.gauss(math.log(100), 0.75)))))


def make_records(n: int, seed: int, max_length: int, tokenizer) -> list[dict]:
    """n prompt/completion records of record_length tokens each (prompt + completion + EOS, as
    lorakit's render tokenizes them), at most max_length."""
    from lorakit.data import Record, render

    rng, out = random.Random(seed), []
    for i in range(n):
        target = record_length(rng, max_length)
        task = rng.choice(list(TASKS))
        words = [rng.choice(WORDS) for _ in range(max(1, target // 3))]  # ~1.5 tokens a word, twice
        while True:
            rec = {"prompt": f"{task} these words: {' '.join(words)}\n", "completion": " ".join(TASKS[task](words))}
            ids, *_ = render(Record(rec, f"gen[{i}]"), "prompt_completion", tokenizer)
            if len(ids) <= min(target, max_length) or len(words) == 1:
                break
            words = words[:-max(1, (len(ids) - target) // 3)]
        out.append(rec)
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    from lorakit.files import write_atomically

    write_atomically(path, "".join(json.dumps(r) + "\n" for r in records))


# --- the contenders, each run in its own process (--child) ------------------------------------------

def packed_batches(rows: int, steps: int) -> tuple[int, int]:
    """(rows per step, steps) for a packed mode: one epoch over `rows` rows in about `steps` steps."""
    per_step = max(1, rows // steps)
    return per_step, rows // per_step


def run_lorakit(mode: str, args, data: Path, out: Path) -> dict:
    from lorakit.config import (DataSection, EvalSection, LoraSection, ModelSection, RunConfig, TrainSection)
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.training import SFT, train
    from lorakit.training.setup import load_data

    config = RunConfig(
        method="qlora" if args.qlora else "lora", model=ModelSection(dtype="float32"),
        lora=LoraSection(r=C.RANK, alpha=C.ALPHA, dropout=0.0 if mode == BOUND else args.dropout, targets="all-linear"),
        data=DataSection(train=str(data / "train.jsonl"), validation_fraction=0.0, max_length=args.max_length,
                         packing=mode == "lorakit packed", group_by_length=mode == "lorakit grouped",
                         padding_free=mode in ("lorakit padding-free", BOUND)),
        train=TrainSection(steps=args.steps, batch_size=args.examples, lr=args.lr, schedule="constant",
                           warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0, threads=args.threads,
                           save_every=10**9, gradient_checkpointing=args.gradient_checkpointing, device="cpu"),
        eval=EvalSection(every=0, generate=False))
    if mode == "lorakit packed":
        rows = len(load_data(copy.deepcopy(config), load_tokenizer(resolve_model_dir(None)), log=lambda _: None)[0].examples)
        config.train.batch_size, config.train.steps = packed_batches(rows, args.steps)

    class Counting:
        """lorakit's SFT objective, counting the supervised tokens of the batches it makes."""

        def __init__(self):
            self.sft, self.supervised = SFT(), 0

        def __getattr__(self, name):
            return getattr(self.sft, name)

        def micro_batches(self, *a, **k):
            batches = self.sft.micro_batches(*a, **k)
            self.supervised += sum(self.sft.items(b) for b in batches)
            return batches

    objective = Counting()
    summary = train(config, out / "run", log=lambda _: None, progress=False, objective=objective)
    losses = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if r.get("type") == "train"]
    return {"seconds": summary["train_seconds"], "supervised_tokens": objective.supervised,
            "steps": config.train.steps, "per_step": config.train.batch_size,
            "final_train_loss": losses[-1] if losses else None, "adapter": str(out / "run" / "adapter")}


def run_trl(mode: str, args, data: Path, out: Path) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit.data import epoch_order
    from lorakit.models import default_model_dir, load_model, load_tokenizer

    if args.qlora:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(default_model_dir(), quantization_config=bnb,
                                                     dtype=torch.float32, device_map="cpu")
    else:
        model, _ = load_model(dtype=torch.float32)
    packed, padding_free = mode == "trl packed", mode == "trl padding-free"
    sft = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.examples,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=0, data_seed=0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing, completion_only_loss=True,
        # padding-free without packing does not truncate: the records are within max length already
        max_length=None if padding_free else args.max_length, packing=packed, padding_free=padding_free)
    peft_config = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, lora_dropout=args.dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    records = load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    same_order = args.order == "lorakit" and not packed
    if same_order:  # lorakit's first epoch (every record once: steps x examples of them), read in order below
        records = records.select(epoch_order(len(records), 0, 0))
    trainer = SFTTrainer(model=model, args=sft, processing_class=load_tokenizer(default_model_dir()),
                         train_dataset=records, peft_config=peft_config)
    if same_order:
        trainer._get_train_sampler = lambda dataset=None: SequentialSampler(
            trainer.train_dataset if dataset is None else dataset)
    if packed:
        per_step, steps = packed_batches(len(trainer.train_dataset), args.steps)
        trainer.args.per_device_train_batch_size, trainer.args.max_steps = per_step, steps
        trainer._train_batch_size = per_step
    supervised = [0]
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        supervised[0] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    trainer.data_collator = counting
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **_):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Losses())
    result = trainer.train()
    trainer.save_model(str(out / "adapter"))
    return {"seconds": result.metrics["train_runtime"], "supervised_tokens": supervised[0],
            "steps": trainer.state.global_step, "per_step": trainer.args.per_device_train_batch_size,
            "final_train_loss": losses[-1] if losses else None, "adapter": str(out / "adapter")}


def child(args) -> int:
    from lorakit.files import write_atomically

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    run = run_lorakit if args.child in LORAKIT_RUNS else run_trl
    result = run(args.child, args, Path(args.data), out)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    write_atomically(out / "result.json", json.dumps(result))
    return 0


# --- one evaluation for everyone ------------------------------------------------------------------

def nf4_round_trip_(model: torch.nn.Module) -> torch.nn.Module:
    """Every linear weight but the head replaced by its NF4 value (double quantization), in place:
    the frozen base both QLoRA contenders train on, in float32."""
    from lorakit.nf4 import dequantize, quantize_nf4
    from lorakit.surgery import output_head_names

    head = output_head_names(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name not in head:
                module.weight.copy_(dequantize(quantize_nf4(module.weight, double_quant=True), torch.float32))
    return model


def heldout_loss(base: torch.nn.Module, adapter: str, examples) -> float:
    """Mean cross-entropy per completion token of `examples` (lorakit Examples) under base + the
    PEFT-format adapter in `adapter` (loaded by peft), one example at a time (no padding)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            labels = torch.tensor(e.labels[1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


# --- the parent: data, interleaved repetitions, the table ---------------------------------------

def spread(values: list[float]) -> str:
    return f"{min(values):,.1f}-{max(values):,.1f}" if len(values) > 1 else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qlora", action="store_true", help="lorakit qlora vs trl + peft + bitsandbytes nf4")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--examples", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=1024, help="longest record, in tokens")
    parser.add_argument("--heldout", type=int, default=32, help="held-out records for the final loss")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every contender")
    parser.add_argument("--dropout", type=float, default=C.DROPOUT, help="LoRA dropout, for every contender")
    parser.add_argument("--order", choices=("lorakit", "own"), default="lorakit",
                        help="lorakit: trl padded / padding-free get lorakit padded's batches; own: trl's shuffle")
    parser.add_argument("--contenders", default=",".join(LORAKIT + TRL),
                        help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    parser.add_argument("--keep", action="store_true", help="keep the data, runs and adapters (temporary directory)")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"--contenders: unknown {', '.join(map(repr, unknown))}; valid choices: {', '.join(CONTENDERS)}")
    C.setup(args.threads)

    from lorakit.data import Record, build_dataset
    from lorakit.models import load_model

    base, tokenizer = load_model(dtype=torch.float32)
    if args.qlora:
        nf4_round_trip_(base)
    work = Path(tempfile.mkdtemp(prefix="sft_vs_trl-"))
    train_records = make_records(args.steps * args.examples, 0, args.max_length, tokenizer)
    write_jsonl(work / "train.jsonl", train_records)
    held = build_dataset([Record(r, f"heldout[{i}]") for i, r in enumerate(make_records(args.heldout, 1, args.max_length,
                                                                                        tokenizer))],
                         tokenizer, "prompt_completion", args.max_length).examples
    lengths = sorted(len(e.input_ids) for e in build_dataset(
        [Record(r, "") for r in train_records], tokenizer, "prompt_completion", args.max_length).examples)
    print(f"data: {len(lengths)} train records in {work}, tokens median {statistics.median(lengths):.0f}, "
          f"max {lengths[-1]}, total {sum(lengths):,}; {len(held)} held-out records", flush=True)

    results: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(args.reps):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            out = work / f"rep{k}" / name.replace(" ", "-")
            out.mkdir(parents=True)
            cmd = [sys.executable, __file__, "--child", name, "--data", str(work), "--out", str(out),
                   "--steps", str(args.steps), "--examples", str(args.examples), "--max-length", str(args.max_length),
                   "--lr", str(args.lr), "--threads", str(args.threads), "--dropout", str(args.dropout),
                   "--order", args.order]
            cmd += ["--qlora"] * args.qlora + ["--gradient-checkpointing"] * args.gradient_checkpointing
            # a lorakit contender's process as `lorakit train`'s: lorakit, imported before torch there,
            # puts torch's large CPU tensors on huge pages (lorakit/__init__.py); this script imports torch first
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")} \
                if name in LORAKIT_RUNS else None
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if proc.returncode:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                raise SystemExit(f"{name} failed (exit {proc.returncode})")
            r = json.loads((out / "result.json").read_text())
            r["heldout_loss"] = heldout_loss(base, r["adapter"], held)
            r["tokens_per_s"] = r["supervised_tokens"] / r["seconds"]
            results[name].append(r)
            print(f"  rep {k + 1}/{args.reps} {name}: {r['tokens_per_s']:.1f} supervised tokens/s "
                  f"({r['supervised_tokens']:,} in {r['seconds']:.1f} s, {r['steps']} steps), peak RSS "
                  f"{C.mib(r['peak_rss_bytes'])}, held-out loss {r['heldout_loss']:.4f} "
                  f"(process {time.perf_counter() - t0:.0f} s)", flush=True)

    med = {n: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "peak_rss_bytes", "heldout_loss")}
           for n, rs in results.items()}
    trl_modes = [n for n in names if n in TRL]
    ref = max(trl_modes, key=lambda n: med[n]["tokens_per_s"]) if trl_modes else names[0]
    rows = []
    for n, rs in results.items():
        m = med[n]
        rows.append([n, f"{rs[-1]['steps']} x {rs[-1]['per_step']}", f"{rs[-1]['supervised_tokens']:,}",
                     f"{m['tokens_per_s']:,.1f}", spread([r["tokens_per_s"] for r in rs]),
                     f"{m['tokens_per_s'] / med[ref]['tokens_per_s']:.2f}", C.mib(m["peak_rss_bytes"]),
                     f"{m['peak_rss_bytes'] / med[ref]['peak_rss_bytes']:.2f}", f"{m['heldout_loss']:.4f}",
                     f"{rs[-1]['final_train_loss']:.4f}" if rs[-1]["final_train_loss"] is not None else "-"])
    method = "QLoRA" if args.qlora else "LoRA"
    print(f"\n{method}: SmolLM2-135M fp32, {args.steps} steps x {args.examples} examples, max length "
          f"{args.max_length}, r={C.RANK} all-linear, lr {args.lr} constant, {args.reps} interleaved reps, "
          f"{args.threads} threads, dropout {args.dropout}, order {args.order}; reference: {ref}")
    print(C.table(["contender", "steps x batch", "supervised tokens", "tokens/s", "spread", f"/ {ref}",
                   "peak RSS", f"RSS / {ref}", "held-out loss", "last train loss"], rows))
    lorakit_modes = [n for n in names if n in LORAKIT_RUNS]
    summary = {"method": method, "reference": ref, "reps": args.reps, "steps": args.steps, "examples": args.examples,
               "max_length": args.max_length, "order": args.order, "dropout": args.dropout}
    for n in lorakit_modes:
        key = "padding_free_without_dropout" if n == BOUND else n.split()[1].replace("-", "_")
        summary[f"{key}_tokens_per_s_ratio"] = round(med[n]["tokens_per_s"] / med[ref]["tokens_per_s"], 3)
        summary[f"{key}_peak_rss_ratio"] = round(med[n]["peak_rss_bytes"] / med[ref]["peak_rss_bytes"], 3)
        summary[f"{key}_heldout_loss_diff"] = round(med[n]["heldout_loss"] - med[ref]["heldout_loss"], 4)
    if not args.keep:
        shutil.rmtree(work)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
