"""optim.parameter_groups: the optimizer's groups and learning rates are what the config says."""

import pytest
import torch
from conftest import MLP, tiny_llama

from lorakit import LoraConfig, add_lora
from lorakit.optim import parameter_groups


def names(model, group):
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_without_loraplus_one_group_in_model_order():
    model = add_lora(tiny_llama(), LoraConfig(r=4, targets=["q_proj", "v_proj"], dora=True))
    (group,) = parameter_groups(model, 1e-3, 0.1)
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.1)
    assert group["params"] == [p for p in model.parameters() if p.requires_grad]
    assert len(group["params"]) == 2 * 2 * 3  # A, B, m of q and v in two layers


def test_loraplus_gives_b_ratio_times_the_learning_rate():
    model = add_lora(MLP(), LoraConfig(r=2, targets=["emb", "fc1", "fc2"], dora=True, modules_to_save=None))
    a_group, b_group = parameter_groups(model, 2e-4, 0.01, loraplus_ratio=16)
    assert (a_group["lr"], b_group["lr"]) == (2e-4, pytest.approx(3.2e-3, rel=1e-12))
    assert a_group["weight_decay"] == b_group["weight_decay"] == 0.01
    assert names(model, b_group) == ["emb.lora_embedding_B.default", "fc1.lora_B.default.weight",
                                     "fc2.lora_B.default.weight"]
    assert names(model, a_group) == ["emb.lora_magnitude_vector.default", "emb.lora_embedding_A.default",
                                     "fc1.lora_magnitude_vector.default", "fc1.lora_A.default.weight",
                                     "fc2.lora_magnitude_vector.default", "fc2.lora_A.default.weight"]
    # an optimizer takes the groups as they are
    opt = torch.optim.SGD(parameter_groups(model, 0.1, 0.0, loraplus_ratio=4))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.4]


def test_bad_ratio_and_no_b_are_refused():
    model = add_lora(MLP(), LoraConfig(r=2, targets=["fc1"]))
    for bad in (0, -1.0, True, "16"):
        with pytest.raises(ValueError, match=rf"loraplus_ratio={bad!r}: must be a number > 0"):
            parameter_groups(model, 1e-3, 0.0, bad)
    full = MLP()
    with pytest.raises(ValueError, match="no adapter B matrix trains in this model"):
        parameter_groups(full, 1e-3, 0.0, 16)
