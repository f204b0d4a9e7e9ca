import math

import pytest
from conftest import MLP, tiny_gpt2, tiny_llama

from lorakit import ConfigError, LoraConfig, add_lora
from lorakit.inject import resolve_targets


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        LoraConfig(r=0, alpha=-1, dropout=1.0, bias="some", init="xavier", targets="q_proj(",
                   rank_pattern={"q_proj": 0}, layers=[-1])
    problems = e.value.problems
    assert len(problems) == 8
    text = str(e.value)
    for fragment in ("r=0", "alpha=-1", "dropout=1.0", "bias='some'", "none, all, lora_only",
                     "init='xavier'", "default, gaussian, random", "not a valid regular expression",
                     "rank_pattern['q_proj']=0", "layers=[-1]"):
        assert fragment in text


@pytest.mark.parametrize("kwargs, fragment", [
    ({"r": 2.5}, "r=2.5"),
    ({"r": True}, "r=True"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"targets": []}, "targets=[]"),
    ({"targets": [1, 2]}, "targets=[1, 2]"),
    ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head'"),
    ({"layers_pattern": "layers"}, "layers_pattern is set but layers is not"),
    ({"alpha_pattern": {"v_proj": 0}}, "alpha_pattern['v_proj']=0"),
    # regexes that may backtrack without end on a module name (patterns.py) are refused, not run
    ({"targets": "((.)*)*!"}, "targets='((.)*)*!': '((.)*)*!' can align with a 128-character module name"),
    ({"exclude": r"(\w+\.)*x"}, "exclude=" + repr(r"(\w+\.)*x") + ": "),
    ({"rank_pattern": {r"(.|\w)*": 4}}, "rank_pattern[" + repr(r"(.|\w)*") + "]: "),
    ({"alpha_pattern": {"((.)*)*!": 4}}, "alpha_pattern['((.)*)*!']: "),
])
def test_single_errors_name_the_value(kwargs, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        LoraConfig(**kwargs)
    assert fragment in str(e.value) and len(e.value.problems) == 1


def test_scaling_and_patterns():
    c = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    assert c.scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert c.rank_and_alpha("model.layers.0.self_attn.v_proj") == (4, 16)
    assert c.scaling("model.layers.0.self_attn.v_proj") == 4.0
    assert c.rank_and_alpha("model.layers.1.self_attn.q_proj") == (8, 2)
    # "v_proj" must match at a dot boundary, not inside another name
    assert c.rank_and_alpha("model.layers.0.self_attn.xv_proj") == (8, 16)
    assert LoraConfig(r=16, alpha=8, rslora=True).scaling("x") == pytest.approx(8 / math.sqrt(16))


def test_peft_dict_round_trip():
    c = LoraConfig(r=4, alpha=8, dropout=0.1, targets=["v_proj", "q_proj"], bias="lora_only",
                   modules_to_save=["lm_head"], layers=[1], rank_pattern={"q_proj": 2}, rslora=True,
                   init="gaussian")
    d = c.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["lora_alpha"] == 8 and d["use_rslora"] is True
    assert d["init_lora_weights"] == "gaussian" and d["layers_to_transform"] == [1]
    assert LoraConfig.from_peft_dict(d) == c


def test_peft_features_lorakit_lacks_are_refused():
    with pytest.raises(ConfigError) as e:
        LoraConfig.from_peft_dict({"peft_type": "LORA", "r": 4, "use_qalora": True, "lora_bias": True})
    assert len(e.value.problems) == 2 and "use_qalora=True" in str(e.value)
    # DoRA is supported now (tests/test_dora.py); an init lorakit lacks is named with the supported ones
    assert LoraConfig.from_peft_dict({"r": 4, "use_dora": True}).dora is True
    with pytest.raises(ConfigError, match=r"init_lora_weights='corda': not supported by lorakit; supported: "
                                          r"true, false, 'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq'"):
        LoraConfig.from_peft_dict({"r": 4, "init_lora_weights": "corda"})


def test_variant_and_init_keys_round_trip_through_peft_and_report_every_problem():
    for config, peft_init in ((LoraConfig(init="pissa", pissa_niter=4, dora=True), "pissa_niter_4"),
                              (LoraConfig(init="pissa"), "pissa"), (LoraConfig(init="olora"), "olora"),
                              (LoraConfig(init="loftq", loftq_iters=3), "loftq")):
        d = config.to_peft_dict()
        assert (d["init_lora_weights"], d["use_dora"]) == (peft_init, config.dora)
        assert LoraConfig.from_peft_dict(d) == config
    assert LoraConfig(init="loftq", loftq_iters=3).to_peft_dict()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    with pytest.raises(ConfigError) as e:
        LoraConfig(init="svd", pissa_niter=-1, loftq_iters=0, dora="yes")
    assert e.value.problems == [
        "init='svd': valid choices are default, gaussian, random, pissa, olora, loftq",
        "pissa_niter=-1: must be an integer >= 0 (subspace iterations of the randomized SVD; typical: 4 to 16), "
        "or None for the full SVD",
        "loftq_iters=0: must be an integer > 0 (typical: 1 to 5)",
        "dora='yes': must be true or false"]
    with pytest.raises(ConfigError, match=r"pissa_niter=4 is set but init='olora': it applies to init='pissa' only"):
        LoraConfig(init="olora", pissa_niter=4)
    # the rank-2r config of a converted PiSSA adapter keeps every module's scale
    for rslora in (False, True):
        c = LoraConfig(r=4, alpha=8, init="pissa", rslora=rslora, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
        doubled = c.doubled_rank()
        assert (doubled.r, doubled.init, doubled.rank_pattern) == (8, "default", {"q_proj": 4})
        for module in ("q_proj", "v_proj", "k_proj"):
            assert doubled.scaling(module) == pytest.approx(c.scaling(module), rel=1e-12)


def test_run_config_variant_keys():
    from lorakit.config import RunConfig

    run = RunConfig.from_dict({}, ["lora.dora=true", "lora.init=pissa", "lora.pissa_niter=8", "train.loraplus_ratio=16"])
    config = run.lora.lora_config()
    assert (config.dora, config.init, config.pissa_niter, run.train.loraplus_ratio) == (True, "pissa", 8, 16)
    assert RunConfig().train.loraplus_ratio is None and RunConfig().lora.dora is False
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, ["lora.init=svd", "train.loraplus_ratio=0", "lora.dora=3"])
    assert e.value.problems == ["lora.init='svd': valid choices are default, gaussian, random, pissa, olora, loftq",
                                "lora.dora=3: expected bool",
                                "train.loraplus_ratio=0: must be > 0 (typical: 16), or null for off"]
    with pytest.raises(ConfigError, match="peft_type='IA3'"):
        LoraConfig.from_peft_dict({"peft_type": "IA3"})


def test_targets_matching_nothing_lists_the_linear_modules():
    model = tiny_llama()
    with pytest.raises(ValueError) as e:
        add_lora(model, LoraConfig(targets=["qproj"]))
    msg = str(e.value)
    assert "['qproj']" in msg and "match no module" in msg
    assert "linear modules here: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in msg
    # the model was not touched
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_module_and_missing_default():
    with pytest.raises(ValueError, match="LoRA cannot adapt: model.layers.0.self_attn \\(LlamaAttention\\)"):
        add_lora(tiny_llama(), LoraConfig(targets=r"model\.layers\.0\.self_attn"))
    with pytest.raises(ValueError, match="no default LoRA targets .* linear modules here: fc1, fc2"):
        add_lora(MLP(), LoraConfig())


def test_target_matching_rules():
    model = tiny_llama()
    names = lambda **kw: resolve_targets(model, LoraConfig(**kw))  # noqa: E731
    assert names() == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert names(targets=["v_proj"], layers=[1]) == ["model.layers.1.self_attn.v_proj"]
    assert names(targets=r".*\.1\..*_proj", exclude=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]) == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    all_linear = names(targets="all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    # "proj" alone is not a full name or a dotted suffix of any module
    with pytest.raises(ValueError, match="match no module"):
        names(targets=["proj"])
    assert resolve_targets(tiny_gpt2(), LoraConfig()) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_yaml_duplicate_keys_are_an_error_naming_the_line():
    from lorakit.config import load_yaml

    with pytest.raises(ValueError, match=r"^line 4: duplicate key 'lr' \(first given at line 2\); give each key once$"):
        load_yaml("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    # the same key in two mappings, and merge keys, are fine
    assert load_yaml("a: {x: 1}\nb: {x: 2}\nc: &c {y: 1}\nd: {<<: *c, y: 2}\n") == \
        {"a": {"x": 1}, "b": {"x": 2}, "c": {"y": 1}, "d": {"y": 2}}


def test_yaml_alias_bomb_is_refused_before_it_expands():
    from lorakit.config import MAX_YAML_VALUES, load_yaml

    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(ValueError, match="its aliases expand to more than 100,000 values"):
        load_yaml("targets: [" + ", ".join(levels) + "]")
    with pytest.raises(ValueError, match="recursive alias"):
        load_yaml("a: &a [1, *a]")
    fits = load_yaml("a: &a [" + ", ".join(["1"] * 99) + "]\nb: [" + ", ".join(["*a"] * 100) + "]")
    assert len(fits["b"]) == 100 and 100 * 100 < MAX_YAML_VALUES


def test_method_is_the_one_place_the_4bit_decision_lives():
    from lorakit.config import RunConfig

    assert [RunConfig.from_dict({"method": m}).quantize for m in ("lora", "qlora", "full")] == [None, "nf4", None]
    # configs written while model.quantize existed (a run's config.yaml) load when they agree with the method
    assert RunConfig.from_dict({"method": "qlora", "model": {"quantize": "nf4"}}).quantize == "nf4"
    assert RunConfig.from_dict({"model": {"quantize": "none"}}).to_dict()["model"] == {"path": None, "dtype": "float32"}
    for method in ("lora", "full"):
        with pytest.raises(ConfigError, match=rf"method='{method}' with model.quantize='nf4': .* set method=qlora"):
            RunConfig.from_dict({"method": method, "model": {"quantize": "nf4"}})
    with pytest.raises(ConfigError, match=r"model.quantize='fp4': model.quantize is implied by the method"):
        RunConfig.from_dict({}, ["method=qlora", "model.quantize=fp4"])


def test_variant_rules_between_method_and_adapters():
    from lorakit.config import RunConfig

    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "full", "train": {"loraplus_ratio": 16}})
    assert e.value.problems == ["train.loraplus_ratio=16 with method=full: LoRA+ sets the learning rate of LoRA's "
                                "B matrices, which full fine-tuning does not have; leave it unset"]
    for init in ("pissa", "olora"):
        with pytest.raises(ConfigError, match=rf"lora.init='{init}' with method=qlora: .* use method=lora, or "
                                              r"lora.init=loftq"):
            RunConfig.from_dict({"method": "qlora", "lora": {"init": init}})
    with pytest.raises(ConfigError, match=r"lora.init='loftq' with method=lora: .* use method=qlora"):
        RunConfig.from_dict({"lora": {"init": "loftq"}})
    assert RunConfig.from_dict({"method": "qlora", "lora": {"init": "loftq"}, "train": {"loraplus_ratio": 16}})


def test_target_parameters_in_peft_dict_and_run_config():
    """peft's target_parameters both ways (target_modules [] with it: the parameters only), and
    the run config's lora.target_parameters; their rules all reported at once."""
    from lorakit.config import RunConfig

    c = LoraConfig(r=2, alpha=4, targets=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    d = c.to_peft_dict()
    assert d["target_modules"] == [] and d["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert LoraConfig.from_peft_dict(d) == c
    assert LoraConfig.from_peft_dict({**d, "target_modules": None}).targets == []
    assert "target_parameters" not in LoraConfig().to_peft_dict()  # files of other adapters unchanged
    run = RunConfig.from_dict({}, ["lora.target_parameters=[experts.gate_up_proj]"])
    assert run.lora.lora_config().target_parameters == ["experts.gate_up_proj"]
    assert run.lora.lora_config().targets == "all-linear"  # the linear layers too, as by default
    with pytest.raises(ConfigError) as e:
        LoraConfig(targets=[], target_parameters=["experts.down_proj"], dropout=0.05, init="olora")
    assert e.value.problems == [
        "dropout=0.05 with target_parameters: LoRA on parameters needs dropout 0 (a weight's update cannot drop inputs)",
        "init='olora' with target_parameters: valid choices are default, gaussian, random"]
    with pytest.raises(ConfigError, match=r"targets=\[\]: must be a non-empty list"):
        LoraConfig(targets=[])  # no module and no parameter
