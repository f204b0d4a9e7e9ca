"""GPU check: the CUDA tests, then lorakit LoRA / QLoRA vs peft (+ bitsandbytes) on a ~1B Llama, bf16.

    PYTHONPATH=src python3 bench/gpu_check.py [OUT.json] [--reps 10] [--skip-tests] [--dry-run]
    (bench/gpu_check.sh runs it so, with a time limit: see it for what it needs)

1. The CUDA subset of the tests: every test marked skipif(not torch.cuda.is_available()) in tests/
   (found by reading the files, so a new CUDA test joins by itself), run with pytest.
2. Training steps on a Llama built from a config, random weights, no download: TinyLlama-1.1B's
   shapes (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 key/value heads, vocab 32000),
   bfloat16, batch 8 x 1024 seeded random tokens, LoRA r=16 alpha=32 dropout 0.05 on every linear
   layer but the head, float32 adapters (peft's default too), AdamW. A step is forward, loss,
   backward, optimizer step, zero_grad (then a CUDA synchronize): lorakit's as its training loop
   runs it (fused update, chunked loss: loss.model_loss), peft's as its users run it
   (`model(input_ids, labels=...).loss`). QLoRA: NF4 with double quantization, blocksize 64, bf16
   compute; lorakit's nf4.quantize_linears, and bitsandbytes' Linear4bit under peft (bnb's CUDA kernels).
   Timed interleaved (bench/common.py), median of --reps with the spread (min..max); tokens/s is
   batch x length / median. Peak memory: torch.cuda.max_memory_allocated during one more step above
   what was allocated when it began, plus the contender's resident tensors (parameters, buffers,
   4-bit states, optimizer states, batch): the other contenders' weights, also on the GPU, are not
   counted.
3. NF4 dequantize throughput, lorakit.nf4.dequantize vs bitsandbytes.functional.dequantize_4bit, on
   one decoder layer's seven projection weights (bf16 out), in weights per second.

It prints one table, writes it as JSON (OUT.json, default bench/gpu_check.json; a dry run's
default is bench/gpu_check.dry_run.json, so that it never overwrites a real result) and ends
with one JSON line of ratios (lorakit / peft: tokens/s and peak memory for LoRA and QLoRA,
dequantize throughput). A contender whose library is missing is reported as 'not installed'.

Without a CUDA device it says so and runs a dry run: a shrunken config on the CPU, one step of
each contender (peak memory by the profiler's CPU allocator accounting, as bench/common.py), the
same table and JSON, the CUDA tests listed but not run. tests/test_gpu_check.py runs the dry run.
Exit status: 0 when everything that ran passed; 1 when a CUDA test or an installed contender failed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT, DRY_RUN_OUT = ROOT / "bench" / "gpu_check.json", ROOT / "bench" / "gpu_check.dry_run.json"
RANK, ALPHA, DROPOUT = 16, 32, 0.05
TESTS_TIMEOUT_S = 240


@dataclass(frozen=True)
class Shape:
    """The Llama the steps train, and the batch."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, num_hidden_layers=self.layers,
                           intermediate_size=self.intermediate, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab, max_position_embeddings=2048,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def projections(self) -> list[tuple[int, int]]:
        """(out, in) of one decoder layer's q, k, v, o, gate, up and down projections."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


GPU_SHAPE = Shape(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000, batch=8, seq=1024)
DRY_SHAPE = Shape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256, batch=2, seq=32)


# ----------------------------------------------------------------------------------------------
# 1. The CUDA tests
# ----------------------------------------------------------------------------------------------

CUDA_SKIP = r"@pytest\.mark\.skipif\(\s*not torch\.cuda\.is_available\(\)[^\n]*\n"


def cuda_tests(tests_dir: Path = ROOT / "tests") -> list[str]:
    """pytest node ids of the tests that run only with CUDA: a test function decorated with
    skipif(not torch.cuda.is_available(), ...) (other decorators may follow), or every test of a
    module whose pytestmark is that skipif."""
    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(tests_dir.parent).as_posix()
        if re.search(r"^pytestmark\s*=\s*pytest\.mark\.skipif\(\s*not torch\.cuda\.is_available\(\)", text, re.M):
            ids.append(rel)
            continue
        ids += [f"{rel}::{name}" for name in re.findall(CUDA_SKIP + r"(?:@[^\n]*\n)*def (test_\w+)", text)]
    return ids


def run_tests(ids: list[str], python: str = sys.executable) -> dict:
    """Run the node ids with pytest; its counts, read from its JUnit XML report."""
    import tempfile
    import xml.etree.ElementTree as ET

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cuda_tests.xml"
        try:
            done = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-rfE", f"--junitxml={report}",
                                   *ids], cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            output, rc = f"{e.stdout or ''}\ntimed out after {TESTS_TIMEOUT_S} s", 124
        counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        if report.is_file():
            suite = ET.parse(report).getroot()
            suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts = {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
                      "skipped": n["skipped"], "error": n["errors"]}
    print(output[-3000:], flush=True)
    return {"ran": True, "rc": rc, **counts, "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------------
# 2. Training steps
# ----------------------------------------------------------------------------------------------


def base_model(shape: Shape, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The Llama of `shape`, random weights (seeded), built directly on `device`, in train mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=dtype, attn_implementation="sdpa")
    return model.train()


def lorakit_model(base, quantized: bool, dtype: torch.dtype):
    import lorakit
    from lorakit.nf4 import quantize_linears

    model = copy.deepcopy(base)
    if quantized:  # NF4, double quantization, blocksize 64: QLoRA's recipe
        quantize_linears(model, dtype, skip={"lm_head"})
    return lorakit.add_lora(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear"))


def bnb_quantized(base, dtype: torch.dtype, device: str):
    """A copy of `base` with every linear layer but the head a bitsandbytes Linear4bit (NF4, double
    quantization, blocksize 64, `dtype` compute): the layers transformers' load_in_4bit builds."""
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for name in names:
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
        if linear.bias is not None:
            q.bias = linear.bias
        model.set_submodule(name, q.to(device))  # .to quantizes
    return model


def peft_model(base, quantized: bool, dtype: torch.dtype, device: str):
    from peft import LoraConfig, get_peft_model

    model = bnb_quantized(base, dtype, device) if quantized else copy.deepcopy(base)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear")
    return get_peft_model(model, config)


class Trainer:
    """One contender: a model, its AdamW, its loss, one batch."""

    def __init__(self, name: str, model, ids: torch.Tensor, lorakit_loss: bool):
        from lorakit.loss import model_loss

        self.name, self.model, self.ids = name, model, ids
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.cuda = ids.is_cuda
        if lorakit_loss:
            self.loss = lambda: model_loss(model, input_ids=ids, labels=ids)
        else:
            self.loss = lambda: model(input_ids=ids, labels=ids).loss

    def step(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        return loss

    def peak_memory(self) -> int:
        """The contender's resident tensors plus the allocator's peak during one step above its start."""
        resident = C.resident_bytes(*C.model_tensors(self.model), *C.optimizer_tensors(self.opt), self.ids)
        if not self.cuda:
            return resident + C.allocator_peak(self.step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        self.step()
        return resident + torch.cuda.max_memory_allocated() - start


# (name, library it needs besides torch, how it is built): peft's rows are the reference of lorakit's
CONTENDERS = [
    ("lorakit LoRA", (), lambda base, dtype, device: lorakit_model(base, False, dtype)),
    ("peft LoRA", ("peft",), lambda base, dtype, device: peft_model(base, False, dtype, device)),
    ("lorakit QLoRA", (), lambda base, dtype, device: lorakit_model(base, True, dtype)),
    ("peft+bnb QLoRA", ("peft", "bitsandbytes"), lambda base, dtype, device: peft_model(base, True, dtype, device)),
]


def missing(modules: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def step_rows(shape: Shape, dtype: torch.dtype, device: str, reps: int) -> list[dict]:
    base = base_model(shape, dtype, device)
    ids = C.token_batch(shape.vocab, shape.batch, shape.seq).to(device)
    rows, trainers = [], []
    for name, needs, build in CONTENDERS:
        row = {"name": name, "status": "ok"}
        rows.append(row)
        absent = missing(needs)
        if absent:
            row["status"] = f"not installed: {', '.join(absent)}"
            continue
        try:
            trainer = Trainer(name, build(base, dtype, device), ids, lorakit_loss=name.startswith("lorakit"))
            row["first_step_loss"] = trainer.step().item()  # also the warm-up: AdamW's states now exist
            trainers.append((row, trainer))
        except Exception as e:  # noqa: BLE001 (reported in the table; the others still run)
            row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
    del base
    timed = [C.Contender(t.name, t.step) for _, t in trainers]
    if timed:
        C.time_alternating(timed, reps=reps, warmup=0, verbose=False)
    for (row, trainer), c in zip(trainers, timed):
        row.update(median_s=c.median, min_s=min(c.times), max_s=max(c.times),
                   tokens_per_s=shape.batch * shape.seq / c.median, peak_memory_bytes=trainer.peak_memory())
    return rows


# ----------------------------------------------------------------------------------------------
# 3. NF4 dequantize throughput
# ----------------------------------------------------------------------------------------------


def dequantize_rows(shape: Shape, dtype: torch.dtype, device: str, reps: int, inner: int) -> list[dict]:
    """lorakit.nf4.dequantize vs bitsandbytes' dequantize_4bit, `inner` passes over one decoder
    layer's projection weights per timed repetition."""
    from lorakit.nf4 import dequantize, quantize_nf4

    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype) for s in shape.projections()]
    n = sum(w.numel() for w in weights)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def passes(one):
        def run():
            for _ in range(inner):
                one()
            sync()
        return run

    ours = [quantize_nf4(w) for w in weights]
    rows = [{"name": "dequantize lorakit", "status": "ok"}, {"name": "dequantize bnb", "status": "ok"}]
    timed = [C.Contender(rows[0]["name"], passes(lambda: [dequantize(s, dtype) for s in ours]))]
    absent = missing(("bitsandbytes",))
    if absent:
        rows[1]["status"] = "not installed: bitsandbytes"
    else:
        try:
            import bitsandbytes.functional as F

            theirs = [F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]
            rows[1]["same_packed_bytes"] = all(torch.equal(o.packed.reshape(-1), t[0].reshape(-1))
                                               for o, t in zip(ours, theirs))
            timed.append(C.Contender(rows[1]["name"], passes(lambda: [F.dequantize_4bit(p, s) for p, s in theirs])))
        except Exception as e:  # noqa: BLE001
            rows[1]["status"] = f"failed: {type(e).__name__}: {e}"[:300]
    C.time_alternating(timed, reps=reps, warmup=1, verbose=False)
    for row, c in zip(rows, timed):
        row.update(median_s=c.median, min_s=min(c.times), max_s=max(c.times), weights_per_s=n * inner / c.median)
    return rows


# ----------------------------------------------------------------------------------------------
# The table, the JSON, the ratios
# ----------------------------------------------------------------------------------------------


def ratio(rows: list[dict], ours: str, theirs: str, key: str) -> float | None:
    a, b = (next((r for r in rows if r["name"] == n), {}) for n in (ours, theirs))
    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None


def ratios(steps: list[dict], dequant: list[dict], tests: dict, dry_run: bool) -> dict:
    return {"lora_tokens_per_s_ratio": ratio(steps, "lorakit LoRA", "peft LoRA", "tokens_per_s"),
            "lora_peak_memory_ratio": ratio(steps, "lorakit LoRA", "peft LoRA", "peak_memory_bytes"),
            "qlora_tokens_per_s_ratio": ratio(steps, "lorakit QLoRA", "peft+bnb QLoRA", "tokens_per_s"),
            "qlora_peak_memory_ratio": ratio(steps, "lorakit QLoRA", "peft+bnb QLoRA", "peak_memory_bytes"),
            "dequantize_throughput_ratio": ratio(dequant, "dequantize lorakit", "dequantize bnb", "weights_per_s"),
            "tests_failed": tests.get("failed", 0) + tests.get("error", 0) if tests.get("ran") else None,
            "dry_run": dry_run}


def table(steps: list[dict], dequant: list[dict]) -> str:
    def spread(r):
        return f"{r['min_s'] * 1e3:,.1f}..{r['max_s'] * 1e3:,.1f}" if "median_s" in r else "-"

    rows = []
    for r in steps:
        ref = "peft LoRA" if "LoRA" in r["name"] and "QLoRA" not in r["name"] else "peft+bnb QLoRA"
        vs = [ratio(steps, r["name"], ref, k) for k in ("tokens_per_s", "peak_memory_bytes")]
        rows.append([r["name"], r["status"], f"{r['median_s'] * 1e3:,.1f} ms" if "median_s" in r else "-", spread(r),
                     f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else "-",
                     C.mib(r["peak_memory_bytes"]) if "peak_memory_bytes" in r else "-",
                     "-" if r["name"] == ref or vs[0] is None else f"{vs[0]:.2f}x tok/s, {vs[1]:.2f}x mem"])
    for r in dequant:
        vs = ratio(dequant, r["name"], "dequantize bnb", "weights_per_s")
        rows.append([r["name"], r["status"], f"{r['median_s'] * 1e3:,.2f} ms" if "median_s" in r else "-", spread(r),
                     f"{r['weights_per_s'] / 1e9:,.3g} G weights/s" if "weights_per_s" in r else "-", "-",
                     "-" if r["name"] == "dequantize bnb" or vs is None else f"{vs:.2f}x throughput"])
    return C.table(["what", "status", "median", "spread (ms)", "throughput", "peak memory", "vs peft / bnb"], rows)


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help=f"the JSON written (default {DEFAULT_OUT.relative_to(ROOT)}; "
                                               f"a dry run's {DRY_RUN_OUT.relative_to(ROOT)})")
    parser.add_argument("--reps", type=int, default=10, help="interleaved timed repetitions (median reported)")
    parser.add_argument("--skip-tests", action="store_true", help="leave the CUDA tests out")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run even where CUDA is available")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dry_run = args.dry_run or not torch.cuda.is_available()
    if dry_run:
        print("no CUDA device: dry run on the CPU (a shrunken config, one step of each contender; the CUDA tests "
              "are listed, not run)" if not torch.cuda.is_available() else "dry run (--dry-run)", flush=True)
        C.setup(threads=min(2, torch.get_num_threads()))
    shape, device, dtype = (DRY_SHAPE, "cpu", torch.bfloat16) if dry_run else (GPU_SHAPE, "cuda", torch.bfloat16)
    reps = 1 if dry_run else args.reps
    start = time.perf_counter()

    ids = cuda_tests()
    tests = {"node_ids": ids, "ran": False}
    if not dry_run and not args.skip_tests:
        tests.update(run_tests(ids))
    steps = step_rows(shape, dtype, device, reps)
    dequant = dequantize_rows(shape, dtype, device, reps, inner=1 if dry_run else 50)

    report = {"dry_run": dry_run, "device": torch.cuda.get_device_name() if not dry_run else "cpu",
              "versions": versions(), "model": {**asdict(shape), "dtype": str(dtype).removeprefix("torch."),
                                                "parameters": count_parameters(shape)},
              "lora": {"r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "targets": "all-linear"},
              "reps": reps, "tests": tests, "steps": steps, "dequantize": dequant,
              "seconds": round(time.perf_counter() - start, 1)}
    report["ratios"] = ratios(steps, dequant, tests, dry_run)
    from lorakit.files import write_atomically

    out = Path(args.out) if args.out else (DRY_RUN_OUT if dry_run else DEFAULT_OUT)
    write_atomically(out, json.dumps(report, indent=2) + "\n")
    m = report["model"]
    print(f"\n{report['device']}: Llama {m['parameters'] / 1e6:,.1f}M parameters ({m['hidden']} hidden, {m['layers']} "
          f"layers), {m['dtype']}, batch {m['batch']} x {m['seq']}, LoRA r={RANK} all-linear, {reps} interleaved reps; "
          f"CUDA tests: " + (f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
                             if tests["ran"] else f"{len(ids)} found, not run"))
    print(table(steps, dequant))
    print(f"wrote {out}")
    print(json.dumps(report["ratios"]))
    failed = [r["name"] for r in steps + dequant if r["status"].startswith("failed")]
    return 1 if failed or report["ratios"]["tests_failed"] or (tests["ran"] and tests["rc"] not in (0, 5)) else 0


def count_parameters(shape: Shape) -> int:
    """Parameters of the Llama of `shape`, counted on the meta device (no memory)."""
    return sum(p.numel() for p in base_model(shape, torch.bfloat16, "meta").parameters())


if __name__ == "__main__":
    sys.exit(main())
