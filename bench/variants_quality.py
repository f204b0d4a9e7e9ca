"""LoRA variants and initialisations on the built-in task: held-out loss and exact match (issue 17).

    nice -n 19 .venv/bin/python bench/variants_quality.py                 # every row, 30 steps (the default run's)
    nice -n 19 .venv/bin/python bench/variants_quality.py --steps 10 --rows lora,dora
    .venv/bin/python bench/variants_quality.py --quick                    # 2 steps, 8 test examples: a smoke run

Every row is the default run (`lorakit train` with no config: SmolLM2-135M-Instruct, float32,
builtin:stardate, r=8, alpha=16 on all linear layers, batch 16, AdamW lr 2e-3, cosine after 5
warm-up steps, seed 0, or --seed) with one change, trained through the Python API (training.train) into a
directory under /tmp:

  lora       the default run
  full       method=full at lr 2e-4 (train.lr x probe.FULL_LR_FACTOR, `lorakit probe`'s reference lr)
  dora       lora.dora=true
  pissa      lora.init=pissa (full SVD)
  olora      lora.init=olora
  lora+      train.loraplus_ratio=16
  qlora      method=qlora (NF4 base): the reference of LoftQ
  loftq      method=qlora, lora.init=loftq (1 alternation)

The same seed, data, batches and number of steps for all; eval.every=0 (no held-out loss during
training: it changes nothing in the training, and costs time). Reported: the held-out loss (the
validation split, val_loss) and the exact match on the test split (200 examples, or the first
--limit; greedy), before and after training, from each run's summary.json. Wall time is not
reported: the machine is shared.
One JSON line per row is printed as each row finishes (a partial run keeps its rows), then the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from lorakit.config import RunConfig
from lorakit.probe import FULL_LR_FACTOR
from lorakit.training import train

DEFAULT_LR = 2e-3
ROWS: dict[str, list[str]] = {
    "lora": [],
    "full": ["method=full", f"train.lr={DEFAULT_LR * FULL_LR_FACTOR:g}"],
    "dora": ["lora.dora=true"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "lora+": ["train.loraplus_ratio=16"],
    "qlora": ["method=qlora"],
    "loftq": ["method=qlora", "lora.init=loftq"],
}


def run_row(name: str, steps: int, limit: int | None, out_root: str, seed: int = 0) -> dict:
    """Train one row and return its before/after held-out numbers."""
    overrides = [*ROWS[name], f"train.steps={steps}", f"train.seed={seed}", "eval.every=0"]
    if limit is not None:
        overrides.append(f"eval.limit={limit}")
    config = RunConfig.from_dict({}, overrides)
    summary = train(config, f"{out_root}/{name.replace('+', 'plus')}", log=lambda *_: None, progress=False)
    before, after = summary["before"] or {}, summary["after"] or {}
    return {"row": name, "overrides": ROWS[name], "steps": summary["steps"], "seed": seed,
            "loss_before": before.get("val_loss"), "loss_after": after.get("val_loss"),
            "em_before": before.get("exact_match"), "em_after": after.get("exact_match")}


def table(results: list[dict]) -> str:
    lines = ["| row | change from the default run | held-out loss before -> after | exact match before -> after |",
             "|---|---|---|---|"]
    for r in results:
        change = ", ".join(r["overrides"]) or "(none)"
        lines.append(f"| {r['row']} | {change} | {r['loss_before']:.4f} -> {r['loss_after']:.4f} "
                     f"| {100 * r['em_before']:.1f}% -> {100 * r['em_after']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps for every row (default 30)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    parser.add_argument("--seed", type=int, default=0, help="train.seed for every row (default 0, the default run's)")
    parser.add_argument("--quick", action="store_true", help="2 steps, 8 test examples, lora and dora")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.limit, args.rows = 2, 8, "lora,dora"
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown row(s) {', '.join(unknown)}; valid: {', '.join(ROWS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="variants_quality_", dir="/tmp") as out_root:
        for name in names:
            results.append(run_row(name, args.steps, args.limit, out_root, args.seed))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
