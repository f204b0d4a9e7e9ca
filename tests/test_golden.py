"""Golden values: the tiny seeded run's loss curve and its adapter, pinned across versions.

A change of numerics (initialisation, the loss, the fused update, the optimizer's use, NF4) fails
here even when every equation test still holds, so that it is a conscious, reviewed act: rerun with
LORAKIT_REGEN_GOLDEN=1 to rewrite tests/golden/*.json, and say why in the commit.

Pinned (CPU, float32): the first 10 training losses at 1e-6 relative; the initial adapter's bytes
exactly (RNG only, no arithmetic); per trained adapter tensor its shape, float64 sum and L2 norm at
1e-6 relative (a checksum that tolerates nothing but summation-order rounding).
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit.adapter_io import adapter_state_dict
from lorakit.config import RunConfig
from lorakit.data import Record, build_dataset
from lorakit.monitor import MetricsLog
from lorakit.training import Prepared, train
from lorakit.training.setup import prepare_model

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("LORAKIT_REGEN_GOLDEN") == "1"
STEPS = 10


def reverse_records(n: int, seed: int) -> list[Record]:
    g = torch.Generator().manual_seed(seed)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 6, (4,), generator=g)) for _ in range(n)]
    return [Record({"prompt": f"<{w}>=", "completion": w[::-1]}, f"golden:{i}") for i, w in enumerate(words)]


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16
                      else t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_tiny_run_matches_its_golden_values(tmp_path, method):
    config = RunConfig.from_dict({}, [
        f"method={method}", "data.train=unused.jsonl", f"train.steps={STEPS}", "train.batch_size=8",
        "train.lr=0.02", "train.warmup_steps=2", "train.save_every=100", "eval.every=0", "eval.generate=false",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"])
    tok = char_tokenizer()
    model = tiny_llama(vocab=len(tok), init_range=0.1)
    if method == "qlora":
        from lorakit.nf4 import quantize_linears

        model = quantize_linears(model, skip={"lm_head"})
    torch.manual_seed(0)
    prepare_model(model, config)
    initial = tensor_sha256(adapter_state_dict(model))
    prepared = Prepared(model, tok, build_dataset(reverse_records(64, 0), tok),
                        build_dataset(reverse_records(16, 1), tok), None)
    train(config, tmp_path, prepared=prepared, progress=False, log=lambda *_: None)
    curve = [r["loss"] for r in MetricsLog(tmp_path / "metrics.jsonl").read() if r["type"] == "train"]
    trained = {name: {"shape": list(t.shape), "sum": t.double().sum().item(), "norm": t.double().norm().item()}
               for name, t in sorted(adapter_state_dict(model).items())}
    found = {"losses": curve, "initial_adapter_sha256": initial, "adapter": trained}

    path = GOLDEN / f"tiny_{method}.json"
    if REGEN:
        path.write_text(json.dumps(found, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert len(curve) == STEPS
    assert curve == pytest.approx(golden["losses"], rel=1e-6, abs=0)
    assert initial == golden["initial_adapter_sha256"]
    assert trained.keys() == golden["adapter"].keys()
    for name, value in golden["adapter"].items():
        assert trained[name]["shape"] == value["shape"], name
        assert trained[name]["sum"] == pytest.approx(value["sum"], rel=1e-6, abs=1e-9), name
        assert trained[name]["norm"] == pytest.approx(value["norm"], rel=1e-6), name
