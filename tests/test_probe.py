"""The convergence probe (lorakit.probe, `lorakit probe`): effective ranks of known ΔW, identical
batches in the full and LoRA runs, and the verdicts on a task built so that rank 1 cannot fit it
and rank 16 can.

The task: a substitution cipher over the 26 lowercase letters, prompt "x" -> completion perm(x).
Each letter needs its own output direction. The adapters sit on v_proj, o_proj and down_proj, which
write (v through o) into the residual stream: at rank 1 each adds one direction per layer, too few
for 26 different answers, while rank 16 has room for them. The tiny Llama is initialised at
0.5 (not 0.02) so that its frozen output head can express confident predictions at all: LoRA does
not train the head, full fine-tuning does. Runs use one thread (fast for a model this small)."""

import json
import math
import random

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit import probe as probe_module
from lorakit.cli import main
from lorakit.config import RunConfig
from lorakit.data import Record, batch_at, build_dataset, collate
from lorakit.probe import (CONVERGES, Probe, effective_rank, probe, progress_share, recommended_rank, render,
                           update_ranks)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PERMUTATION = random.Random(0).sample(LETTERS, len(LETTERS))
STEPS = 60
FULL_LR = 0.01


def cipher(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        x = rng.choice(LETTERS)
        rows.append({"prompt": x, "completion": PERMUTATION[LETTERS.index(x)]})
    return rows


def cipher_data(tok):
    records = [Record(row, f"mem:{i}") for i, row in enumerate(cipher(256, 0))]
    validation = [Record(row, f"val:{i}") for i, row in enumerate(cipher(32, 1))]
    return build_dataset(records, tok), build_dataset(validation, tok), None


def cipher_config(*overrides):
    return RunConfig.from_dict({}, ["data.train=unused.jsonl", "train.batch_size=16", "train.warmup_steps=2",
                                    "train.schedule=constant", "train.threads=1", "train.device=cpu",
                                    "lora.targets=[v_proj,o_proj,down_proj]", *overrides])


def run_probe(*overrides, steps=STEPS):
    tok = char_tokenizer()
    return probe(cipher_config(*overrides), steps, full_lr=FULL_LR, tokenizer=tok, data=cipher_data(tok),
                 base=lambda _: tiny_llama(vocab=len(tok), init_range=0.5), log=lambda *_: None)


# effective rank -----------------------------------------------------------------------------------

def low_rank(k, out=48, inp=32, values=None, seed=0):
    """U diag(values) V^T with orthonormal U (out, k), V (inp, k): singular values exactly `values`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inp, k, generator=g))[0]
    values = torch.ones(k) if values is None else torch.tensor(values)
    return u @ torch.diag(values) @ v.T


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9])
def test_effective_rank_of_a_rank_k_update_is_k(k):
    assert effective_rank(low_rank(k)) == k
    noise = 1e-4 * torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    assert effective_rank(low_rank(k) + noise) == k


def test_effective_rank_counts_the_energy_not_the_rank():
    # k equal singular values: ceil(0.9 k) of them hold 90% (9 of 10 exactly 90%)
    assert effective_rank(low_rank(10)) == 9
    assert effective_rank(low_rank(20, out=64, inp=64)) == 18
    # 10, 1, 0.001: the first holds 100 / 101.000001 = 99% of the energy
    assert effective_rank(low_rank(3, values=[10.0, 1.0, 1e-3])) == 1
    # 3, 2, 1: 9/14 = 64% < 90% <= 13/14 = 93%
    assert effective_rank(low_rank(3, values=[3.0, 2.0, 1.0])) == 2
    assert effective_rank(low_rank(3, values=[3.0, 2.0, 1.0]), energy=0.95) == 3
    assert effective_rank(torch.zeros(8, 4)) == 0


def test_update_ranks_per_module_type_and_recommended_rank():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(32, 48, bias=False),
                                                            "v_proj": torch.nn.Linear(32, 16, bias=False)})
                                       for _ in range(3))
    before = {f"layers.{i}.{t}": model.get_submodule(f"layers.{i}.{t}").weight.detach().clone()
              for i in range(3) for t in ("q_proj", "v_proj")}
    with torch.no_grad():
        for i, k in enumerate((2, 5, 3)):
            model.layers[i]["q_proj"].weight += low_rank(k, seed=i)
            model.layers[i]["v_proj"].weight += low_rank(1, out=16, seed=i)
    ranks = update_ranks(before, model)
    assert ranks == {"q_proj": {"ranks": [2, 5, 3], "limit": 32, "median": 3, "max": 5},
                     "v_proj": {"ranks": [1, 1, 1], "limit": 16, "median": 1, "max": 1}}
    assert recommended_rank(ranks) == 4            # the next power of two at or above 3
    assert recommended_rank({"q": {"median": 200.5, "limit": 4096}}) == 256
    assert recommended_rank({"q": {"median": 300, "limit": 4096}}) == 256   # capped
    assert recommended_rank({"q": {"median": 40, "limit": 32}}) == 32       # no more than a layer can use


def test_progress_share_is_in_log_loss():
    assert progress_share(8.0, 1.0, 1.0) == 1.0
    assert progress_share(8.0, 1.0, 2.0) == pytest.approx(2 / 3)   # ln 4 / ln 8
    assert progress_share(8.0, 1.0, 8.0) == 0.0


# identical batches ------------------------------------------------------------------------------

def test_full_and_lora_runs_see_identical_batches(tmp_path):
    tok = char_tokenizer()
    data = cipher_data(tok)
    config = cipher_config("train.grad_accum=2", "train.seed=3")
    p = Probe(config, 5, tmp_path, lambda *_: None, lambda _: tiny_llama(vocab=len(tok), init_range=0.5), tok, data)
    full_config, lora_config = p.variant("full", FULL_LR), p.variant("lora", 0.01)
    full = p.run("full", full_config, p.model(full_config))
    lora = p.run("lora", lora_config, p.model(lora_config))
    assert len(full.batches) == len(lora.batches) == 5
    for step, (a, b) in enumerate(zip(full.batches, lora.batches), start=1):
        expected = [collate(batch_at(data[0], (step - 1) * 2 + m, 16, 3), tok.pad_token_id)["input_ids"]
                    for m in range(2)]
        assert [x.tolist() for x in a] == [x.tolist() for x in b] == [x.tolist() for x in expected]
    assert full.losses[0] == lora.losses[0]  # same model, same first batch: a fresh adapter changes nothing
    assert full.losses[1] != lora.losses[1]


# verdicts ------------------------------------------------------------------------------------------

def test_rank_1_lags_rank_too_low():
    report = run_probe("lora.r=1", "lora.alpha=2", "train.lr=0.03")
    assert report["verdict"] == "lags: rank too low", report["reason"]
    assert report["batches"]["identical"] and report["batches"]["steps"] == STEPS
    assert report["progress_share"] < 0.6  # 0.50: 1.06 nats against full fine-tuning's 0.15, from 7.43
    # the lr sweep: 0.01x, 0.03x, 0.1x, 0.3x and 3x the configured 0.03; none closes half the gap
    assert [s["lr"] for s in report["lr_sweep"]] == pytest.approx([0.0003, 0.0009, 0.003, 0.009, 0.03, 0.09])
    assert report["advice_basis"] == "held-out loss"  # the data has a validation split
    assert report["best_swept_lr"] == pytest.approx(0.03)  # held-out 1.205, at the configured r=1
    # the effective rank suggests 16, so r=16 (alpha 32: the configured scale 2) runs at 0.03 x 0.1, 0.3, 1:
    # 0.009 is best there (held-out 0.088), 0.03 diverges at that rank; the advice is that measured pair
    assert report["effective_rank"]["rank"] == 16
    assert [(s["r"], s["alpha"], s["lr"]) for s in report["rank_lr_sweep"]] == [
        (16, 32, pytest.approx(0.003)), (16, 32, pytest.approx(0.009)), (16, 32, pytest.approx(0.03))]
    assert report["rank_lr_sweep"][2]["diverged"] and report["rank_lr_sweep"][1]["val_loss"] < 0.1
    assert (report["recommended_rank"], report["recommended_alpha"]) == (16, 32)
    assert report["recommended_lr"] == pytest.approx(0.009)
    # the full fine-tuning update needs more than one direction in every module type
    per_type = report["effective_rank"]["per_type"]
    assert set(per_type) == {"v_proj", "o_proj", "down_proj"}
    assert all(len(e["ranks"]) == 2 and 1 < e["median"] <= e["limit"] for e in per_type.values())
    assert report["recommended_rank"] == 16  # down_proj's median is 14 (v_proj 9, o_proj 9.5)
    # capacity: r=1 on 2 layers (hidden 32, kv 16, intermediate 64): v (32+16) + o (32+32) + down (64+32)
    # = 208 per layer
    c = report["capacity"]
    assert c["adapter_parameters"] == 416 and c["capacity_bits"] == 832
    assert c["supervised_tokens"] == 512  # 256 examples x (the letter + the end-of-turn token)
    assert c["information_bits"] == pytest.approx(512 * (report["start_loss"] - report["final_loss"]["full"])
                                                  / math.log(2))
    assert c["information_bits"] > 832 and "large for the rank" in c["warning"]
    assert "rank too low" in render(report)


def test_rank_16_converges_like_full_fine_tuning():
    report = run_probe("lora.r=16", "lora.alpha=32", "train.lr=0.01")
    assert report["verdict"] == CONVERGES, report["reason"]
    assert report["progress_share"] > 0.95  # 1.03: LoRA's 0.134 below the reference's 0.151
    assert report["final_loss"]["lora"] < report["final_loss"]["full"] * 2
    assert report["capacity"]["adapter_parameters"] == 16 * 416 and report["capacity"]["warning"] is None


def test_learning_rate_100x_too_high():
    report = run_probe("lora.r=16", "lora.alpha=32", "train.lr=1.0")
    assert "learning rate too high" in report["verdict"], report["reason"]
    assert [s["lr"] for s in report["lr_sweep"]] == pytest.approx([0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    assert report["recommended_lr"] == pytest.approx(0.01)
    assert report["rank_lr_sweep"] == [] and report["recommended_rank"] == report["effective_rank"]["rank"] == 16


def test_reference_that_does_not_learn_is_inconclusive():
    tok = char_tokenizer()
    report = probe(cipher_config("train.lr=0.01"), 4, full_lr=1e-9, tokenizer=tok, data=cipher_data(tok),
                   base=lambda _: tiny_llama(vocab=len(tok), init_range=0.5), log=lambda *_: None)
    assert report["verdict"] == "inconclusive: the full fine-tuning reference did not learn"


def test_probe_refuses_full_fine_tuning_and_preference_objectives():
    with pytest.raises(ValueError, match="method=full: the probe compares a LoRA or QLoRA run"):
        probe(cipher_config("method=full"), base=lambda _: None, tokenizer=None, data=None)
    with pytest.raises(ValueError, match="steps=1: the probe needs at least 2 steps"):
        probe(cipher_config(), 1)


def test_probe_does_not_start_when_full_fine_tuning_does_not_fit(monkeypatch):
    import lorakit.planner

    monkeypatch.setattr(lorakit.planner, "available_memory", lambda device: 2**20)  # 1 MiB
    trained = []
    monkeypatch.setattr(probe_module, "train", lambda *a, **k: trained.append(a))
    with pytest.raises(ValueError, match=r"the probe's full fine-tuning reference needs 0\.\d\d GiB .* but cpu has "
                                         r"0\.0 GiB available: the probe cannot run, not even on a subset of layers "
                                         r"\(full fine-tuning of its last layer alone: 0\.\d\d GiB\)"):
        run_probe()
    assert trained == []


def test_when_full_fine_tuning_does_not_fit_the_reference_and_lora_train_the_last_layers(monkeypatch):
    import lorakit.planner
    from lorakit.planner import GiB, arch_from_config, plan_run

    tok = char_tokenizer()
    config = cipher_config("lora.r=4", "lora.alpha=8", "train.lr=0.01")
    arch = arch_from_config(tiny_llama(vocab=len(tok)).config.to_dict())
    full_config = probe_module.variant(config, "full", FULL_LR, 4)
    whole = plan_run(full_config, arch, "cpu").peak
    last = probe_module.subset_plan(full_config, arch, "cpu", 1)
    # the last layer alone: the 1-layer model's plan plus the other layer's weights (fp32, bytes)
    one = plan_run(full_config, arch_from_config({**tiny_llama(vocab=len(tok)).config.to_dict(), "num_hidden_layers": 1}),
                   "cpu")
    assert last == one.peak + 4 * arch.layer_parameters() < whole
    monkeypatch.setattr(lorakit.planner, "available_memory", lambda device: (last + whole) // 2)  # one layer fits
    trained = {}
    real_train = probe_module.train

    def recording_train(run_config, run_dir, prepared, **kwargs):
        trained[run_dir.name] = {n for n, q in prepared.model.named_parameters() if q.requires_grad}
        return real_train(run_config, run_dir, prepared=prepared, **kwargs)

    monkeypatch.setattr(probe_module, "train", recording_train)
    report = probe(config, 4, full_lr=FULL_LR, tokenizer=tok, data=cipher_data(tok),
                   base=lambda _: tiny_llama(vocab=len(tok), init_range=0.5), log=lambda *_: None)
    assert report["layers"] == [1] and report["memory"]["layers"] == [1] and report["memory"]["num_layers"] == 2
    assert report["memory"]["subset_peak_gib"] == last / GiB and report["memory"]["full_peak_gib"] == whole / GiB
    layer_1 = {n for n, _ in tiny_llama(vocab=len(tok)).named_parameters() if n.startswith("model.layers.1.")}
    assert trained["full"] == layer_1 and len(layer_1) == 9  # q k v o gate up down, two norms
    for name in ("lora", "lora x0.01", "lora x3"):
        assert trained[name] and all(n.startswith("model.layers.1.") for n in trained[name]), name
    # r=4 on one layer: v (32+16) + o (32+32) + down (64+32) = 208 per rank
    assert report["capacity"]["adapter_parameters"] == 4 * 208
    assert all(len(e["ranks"]) == 1 for e in report["effective_rank"]["per_type"].values())
    assert report["batches"]["identical"] and report["r"] == 4
    assert "the reference trained layers [1] only" in render(report)


def test_train_only_layers_freezes_all_but_those_blocks():
    model = tiny_llama()
    count = probe_module.train_only_layers(model, [0])
    assert count == sum(q.numel() for q in model.model.layers[0].parameters())
    assert {n for n, q in model.named_parameters() if q.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}


# the command ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def probe_records(tmp_path, monkeypatch):
    """`lorakit probe` records its report in lorakit's cache: a fresh one per test."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "probes"


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    tok = char_tokenizer()
    tiny_llama(vocab=len(tok), init_range=0.5).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, rows in (("train.jsonl", cipher(128, 0)), ("val.jsonl", cipher(16, 1))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "probe.yaml").write_text(
        f"model: {{path: {root / 'model'}}}\n"
        f"data: {{train: {root / 'train.jsonl'}, validation: {root / 'val.jsonl'}, max_leakage: 1}}\n"
        "lora: {r: 4, alpha: 8}\n"
        "train: {lr: 0.01, batch_size: 16, warmup_steps: 1, threads: 1, device: cpu}\n")
    return root


def test_cli_probe_json(probe_dir, capsys):
    out = probe_dir / "out"
    code = main(["probe", str(probe_dir / "probe.yaml"), "--steps", "6", "--full-lr", "0.003", "--json",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report == json.loads((out / "probe.json").read_text())
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["steps"] == 6 and report["r"] == 4 and report["lr"] == 0.01 and report["full_lr"] == 0.003
    assert report["verdict_kind"] in ("converges", "lags", "diverges", "inconclusive")
    assert report["batches"]["identical"] is True and report["batches"]["steps"] == 6
    assert len(report["curves"]["full"]["losses"]) == len(report["curves"]["lora"]["losses"]) == 6
    assert report["curves"]["full"]["losses"][0] == report["curves"]["lora"]["losses"][0]
    assert [s["lr"] for s in report["lr_sweep"]] == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03])
    assert report["capacity"]["supervised_tokens"] == 256  # 128 examples x (the letter + end of turn)
    assert report["memory"]["device"] == "cpu" and 0 < report["memory"]["full_peak_gib"] < 1
    assert report["recommended_rank"] >= 1 and report["recommended_lr"] in [
        s["lr"] for s in report["lr_sweep"] + report["rank_lr_sweep"]]


def test_cli_probe_bad_input(probe_dir, capsys):
    for argv, message in (
            (["--set", "method=full"], "method=full: the probe compares"),
            (["--set", "lora.r=0"], "r=0: the rank must be an integer > 0"),
            (["--full-lr", "0"], "argument --full-lr: must be a number > 0"),
            (["--steps", "1"], "steps=1: the probe needs at least 2 steps")):
        try:
            code = main(["probe", str(probe_dir / "probe.yaml"), *argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_the_rule_constants_are_those_docs_probe_md_states():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "probe.md").read_text()
    for name in ("LAG_TOLERANCE", "LR_CLOSES", "MIN_REFERENCE_PROGRESS", "ENERGY", "CAPACITY_BITS_PER_PARAMETER"):
        assert f"{name} = {getattr(probe_module, name)}" in doc, name


def test_train_summary_holds_the_verdict_of_a_probe_of_the_same_config(probe_dir, probe_records, tmp_path, capsys):
    from lorakit.config import read_run_config
    from lorakit.training.output import probe_diagnostic, probe_key

    config_file = str(probe_dir / "probe.yaml")
    assert main(["probe", config_file, "--steps", "3", "--full-lr", "0.003", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (record,) = probe_records.iterdir()
    assert json.loads(record.read_text()) == report and record.name == f"{report['config_key']}.json"
    # train the same config for another number of steps, logging elsewhere: the same key
    run = tmp_path / "run"
    assert main(["train", config_file, "--set", "train.steps=2", "--set", "train.report_to=[]", "--set",
                 "eval.generate=false", "--out", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    (probed,) = [d for d in summary["diagnostics"] if d["kind"] == "probe"]
    assert (probed["verdict"], probed["verdict_kind"], probed["cause"]) == (
        report["verdict"], report["verdict_kind"], report["cause"])
    assert (probed["recommended_rank"], probed["recommended_lr"], probed["probe_steps"], probed["step"]) == (
        report["recommended_rank"], report["recommended_lr"], 3, 0)
    assert probed["recommended_alpha"] == report["recommended_alpha"] == 8 * report["recommended_rank"] / 4
    assert probed["message"] == (
        f"lorakit probe of this config (3 steps per run): {report['verdict']}; recommended "
        f"lora.r={report['recommended_rank']:g} (configured 4); recommended lora.alpha="
        f"{report['recommended_alpha']:g} (configured 8); recommended train.lr={report['recommended_lr']:g} "
        f"(configured 0.01) ({record})")
    assert probed["message"] in capsys.readouterr().out
    # another rank is another config: no verdict for it
    other = read_run_config(config_file, ["lora.r=8"])
    assert probe_key(other) != report["config_key"] and probe_diagnostic(other) is None
    same = read_run_config(config_file, ["train.steps=500", "train.log_every=7", "eval.every=3"])
    assert probe_key(same) == report["config_key"]
