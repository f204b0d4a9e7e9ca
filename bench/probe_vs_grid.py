"""The probe's advice against a small grid search (issue 19): is `lorakit probe`'s recommended rank and
learning rate what a grid of short LoRA runs finds best on held-out loss?

    nice -n 19 .venv/bin/python bench/probe_vs_grid.py > /tmp/probe_vs_grid.log   # both tasks, 10 steps
    nice -n 19 .venv/bin/python bench/probe_vs_grid.py --tasks stardate --steps 30 # the probe's default steps
    .venv/bin/python bench/probe_vs_grid.py --quick                                # 2 steps, ranks 1 and 4: a smoke run

For each task (`stardate`: the default run's config, `lorakit train` with no config: SmolLM2-135M-
Instruct, float32, builtin:stardate, r=8, alpha=16 on all linear layers, batch 16, AdamW lr 2e-3,
cosine after 5 warm-up steps, seed 0; `zorbish`: the same with data.train=builtin:zorbish):

  1. the probe (lorakit.probe.probe, the Python API of `lorakit probe --json`) at --steps steps: its
     verdict, recommended rank R and recommended learning rate L (the lowest smoothed final
     *training* loss of its sweep: lr x 0.01, 0.03, 0.1, 0.3, 1, 3 at the configured rank);
  2. a grid of LoRA runs of the same steps, through the same run config as the probe's own runs
     (lorakit.probe.variant: same data, seed, batch order and schedule; no eval during training):
     ranks --ranks plus R, with alpha = 2r (alpha / r = 2, the default run's scale, held fixed),
     x learning rates L and its neighbours in the probe's sweep (about 3x below and above; past
     the sweep's ends, L / 3 or L x 3).
     The cells at the configured rank (r=8, alpha=16) are the probe's own sweep runs, not run again
     (their config is the one a grid run would use), but for an lr past the sweep's top;
  3. the held-out loss (the validation split: 5% of the training records, val_loss of summary.json)
     after training, for every cell; the grid's best cell; the probe's pick (R, L): its held-out loss,
     its place in the grid (1 = best) and its loss above the best.

The base model and data are read once per task and every run trains a copy (probe(base=...)), so the
probe records nothing in lorakit's cache. Output dirs live under a temporary directory in /tmp
(--out keeps the probe's probe.json and probe.png per task). Progress goes to stderr; one JSON
line per task as it finishes, then the tables (markdown), and the last stdout line is one JSON
object with every result. No wall time is reported: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from lorakit import monitor
from lorakit.config import RunConfig
from lorakit.models import load_tokenizer, resolve_model_dir
from lorakit.probe import cached_base, probe, variant
from lorakit.training import Prepared, train
from lorakit.training.setup import load_data, prepare_model

TASKS: dict[str, list[str]] = {
    "stardate": [],                                # the default run
    "zorbish": ["data.train=builtin:zorbish"],
}
DEFAULT_RANKS = (1, 4, 16, 64)
DEFAULT_STEPS = 10


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def at_rank(config: RunConfig, r: int) -> RunConfig:
    """`config` with rank r and alpha 2r (the scale alpha / r = 2 of the default run, held fixed)."""
    return RunConfig.from_dict(config.to_dict(), [f"lora.r={r}", f"lora.alpha={2 * r}"])


def grid_lrs(swept: list[float], best: float) -> list[float]:
    """The recommended lr and its neighbours in the probe's sweep (sorted); past its ends, / 3 or x 3."""
    i = swept.index(best)
    below = swept[i - 1] if i > 0 else best / 3
    above = swept[i + 1] if i + 1 < len(swept) else best * 3
    return [below, best, above]


def grid_run(config: RunConfig, steps: int, r: int, lr: float, base, tokenizer, data, workdir: Path) -> dict:
    """One grid cell: a LoRA run at rank r (alpha 2r) and lr, as the probe's runs are set up."""
    cell = variant(at_rank(config, r), config.method, lr, steps)
    model = base(cell)
    torch.manual_seed(cell.train.seed)  # as the probe: the same initial adapters for a given rank
    model = prepare_model(model, cell)
    lines: list[str] = []
    summary = train(cell, workdir / f"r{r}-lr{lr:.3g}", prepared=Prepared(model, tokenizer, *data),
                    log=lines.append, progress=False)
    after = summary.get("after") or {}
    stopped = [d["kind"] for d in summary["diagnostics"] if d["kind"] in monitor.STOPPED]
    return {"r": r, "lr": lr, "val_loss": after.get("val_loss"), "stopped": stopped, "source": "grid"}


def run_task(name: str, steps: int, ranks: list[int], sets: list[str], out: Path | None, workdir: Path,
             probe_only: bool = False) -> dict:
    overrides = [*TASKS[name], "train.seed=0", *sets]
    config = RunConfig.from_dict({}, overrides).validate()
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
    data = load_data(config, tokenizer, log)
    base = cached_base()

    log(f"[{name}] probe, {steps} steps")
    report = probe(config, steps, out=None if out is None else out / name, log=log, base=base,
                   tokenizer=tokenizer, data=data)
    rank, lr = report["recommended_rank"], report["recommended_lr"]
    log(f"[{name}] probe: {report['verdict']}; recommended rank {rank}, lr {lr}")
    if probe_only:  # the pick's held-out loss is one of the probe's own runs
        runs = [{**s, "r": config.lora.r} for s in report["lr_sweep"]] + report["rank_lr_sweep"]
        pick = next((s for s in runs if s["r"] == rank and s["lr"] == lr), {})
        return {"task": name, "steps": steps, "set": sets, "verdict": report["verdict"],
                "probe": {"r": rank, "alpha": report["recommended_alpha"], "lr": lr, "val_loss": pick.get("val_loss"),
                          "basis": report["advice_basis"]},
                "lr_sweep": report["lr_sweep"], "rank_lr_sweep": report["rank_lr_sweep"]}

    # the probe's sweep runs at the configured rank are grid cells already (alpha = 2r there too)
    configured = config.lora.r
    reuse = config.lora.alpha == 2 * configured  # else (--set lora.alpha=...) the grid runs that rank too
    swept = sorted(run["lr"] for key, run in report["curves"].items() if key != "full")
    lrs = grid_lrs(swept, lr) if lr is not None else [config.train.lr / 3, config.train.lr, config.train.lr * 3]
    cells = [{"r": configured, "lr": run["lr"], "val_loss": run["val_loss"],
              "stopped": ["diverged"] if run["diverged"] else [], "source": "probe sweep"}
             for key, run in report["curves"].items() if reuse and key != "full" and run["lr"] in lrs]
    for r in sorted(set(ranks) | {configured} | ({rank} if rank else set())):
        for x in lrs:
            if reuse and r == configured and x in swept:
                continue  # run by the probe
            cell = grid_run(config, steps, r, x, base, tokenizer, data, workdir / name)
            log(f"[{name}] r={r:<4} lr {x:<9.3g} held-out loss {cell['val_loss']}")
            cells.append(cell)

    cells.sort(key=lambda c: (c["r"], c["lr"]))
    scored = sorted((c for c in cells if c["val_loss"] is not None and not c["stopped"]), key=lambda c: c["val_loss"])
    best = scored[0]
    pick = next((c for c in cells if c["r"] == rank and c["lr"] == lr), None)
    place = scored.index(pick) + 1 if pick in scored else None
    return {
        "task": name, "steps": steps, "set": sets, "verdict": report["verdict"], "reason": report["reason"],
        "configured": {"r": configured, "alpha": config.lora.alpha, "lr": config.train.lr},
        "full_val_loss": report["val_loss"]["full"], "full_lr": report["full_lr"],
        "effective_rank": {k: {"median": v["median"], "max": v["max"]}
                           for k, v in report["effective_rank"]["per_type"].items()},
        "probe": {"r": rank, "lr": lr, "val_loss": None if pick is None else pick["val_loss"],
                  "place": place, "of": len(scored),
                  "above_best": None if pick is None or pick["val_loss"] is None
                  else pick["val_loss"] - best["val_loss"]},
        "best": {"r": best["r"], "lr": best["lr"], "val_loss": best["val_loss"]},
        "lr_sweep": report["lr_sweep"], "grid": cells,
    }


def table(result: dict) -> str:
    """One task's grid as markdown: rows rank, columns lr, held-out loss; ** best, [] the probe's pick."""
    lrs = sorted({c["lr"] for c in result["grid"]})
    ranks = sorted({c["r"] for c in result["grid"]})
    cell = {(c["r"], c["lr"]): c for c in result["grid"]}
    lines = ["| rank (alpha = 2r) | " + " | ".join(f"lr {x:.3g}" for x in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for r in ranks:
        row = []
        for x in lrs:
            c = cell.get((r, x))
            text = "" if c is None else "stopped" if c["stopped"] else f"{c['val_loss']:.4f}"
            if c is not None and (r, x) == (result["best"]["r"], result["best"]["lr"]):
                text = f"**{text}**"
            if (r, x) == (result["probe"]["r"], result["probe"]["lr"]):
                text = f"[{text}]"
            row.append(text)
        lines.append(f"| {r} | " + " | ".join(row) + " |")
    p, b = result["probe"], result["best"]
    lines.append("")
    held = "stopped" if p["val_loss"] is None else f"{p['val_loss']:.4f}"
    above = "n/a" if p["above_best"] is None else f"{p['above_best']:+.4f}"
    lines.append(f"probe: {result['verdict']}; recommended r={p['r']}, lr {_lr(p['lr'])} -> held-out "
                 f"{held}, place {p['place'] or '-'} of {p['of']}, {above} above the best "
                 f"(r={b['r']}, lr {b['lr']:.3g}: {b['val_loss']:.4f}); full fine-tuning reference "
                 f"(lr {result['full_lr']:.3g}): {result['full_val_loss']:.4f}")
    return "\n".join(lines)


def _lr(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"optimizer steps of every run, probe and grid (default {DEFAULT_STEPS})")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)),
                        help="grid ranks besides the configured one and the probe's (comma-separated)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a run setting for every task and run, e.g. --set train.batch_size=4 (repeatable)")
    parser.add_argument("--out", default=None, help="keep each task's probe.json and probe.png under OUT/TASK")
    parser.add_argument("--quick", action="store_true", help="2 steps, ranks 1 and 4, stardate only")
    parser.add_argument("--probe-only", action="store_true",
                        help="run the probe alone: its pick and that run's held-out loss (to place against a grid "
                             "measured before with the same settings)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.ranks, args.tasks = 2, "1,4", "stardate"
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="probe-vs-grid-", dir="/tmp") as workdir:
        for name in tasks:
            result = run_task(name, args.steps, ranks, args.sets, Path(args.out) if args.out else None,
                              Path(workdir), args.probe_only)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.probe_only:
        print(json.dumps({"steps": args.steps, "set": args.sets,
                          "tasks": {r["task"]: {"verdict": r["verdict"], "probe": r["probe"]} for r in results}}))
        return
    for result in results:
        print(f"\n### {result['task']} ({result['steps']} steps)\n\n{table(result)}")
    print(json.dumps({"steps": args.steps, "set": args.sets, "tasks": {r["task"]: {
        "verdict": r["verdict"], "probe": r["probe"], "best": r["best"]} for r in results}}))


if __name__ == "__main__":
    main()
