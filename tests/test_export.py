"""GGUF export (gguf_export.py) and the merge check (merge_check.py), verified by the readers users
run: llama.cpp itself (llama-cpp-python) and transformers' GGUF loader.

Tiny models use a byte-level BPE tokenizer trained here in milliseconds (SmolLM2's pre-tokenizer:
digits split off, then GPT-2's regex), so llama.cpp tokenizes with the file's own vocabulary.
Tests marked slow use the real SmolLM2-135M-Instruct.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import CHATML, tiny_llama
from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main
from lorakit.gguf_export import (
    export_adapter,
    export_merged,
    permute_rotary_rows,
    pre_tokenizer_name,
    unpermute_rotary_rows,
)
from lorakit.merge_check import TOLERANCES, MergeCheckError

TEXT = "The quick brown fox jumps over the lazy dog. Stardate 41153.7"


def llama_cpp():
    """llama-cpp-python, built by ./dev test's set-up. Missing: a skip on a laptop, a failure in CI."""
    try:
        import llama_cpp as module
    except ImportError:
        message = "llama-cpp-python is not installed (./dev test builds it: see ./dev)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return module


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT, "What is the capital of France? Paris, it is.", "user assistant system"] * 20,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)


def tiny(kind: str, vocab: int, tie: bool = False, seed: int = 0):
    """A tiny causal LM whose logits are peaked enough for argmax comparisons to mean something."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind == "llama":
        return tiny_llama(tie=tie, seed=seed, vocab=vocab, init_range=0.3)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, initializer_range=0.3,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # q/k/v biases
    return MistralForCausalLM(MistralConfig(**common, sliding_window=64)).eval()


def adapted(model, seed: int = 1, **config):
    """The model with a LoRA adapter whose B is random (not zero), so that merging changes logits."""
    torch.manual_seed(seed)
    config = {"r": 4, "alpha": 8, "targets": "all-linear", "init": "random", **config}
    return add_lora(model, LoraConfig(**config))


def ids_of(tokenizer, text=TEXT):
    return tokenizer(text)["input_ids"]


def cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def cpp_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def hf_greedy(model, ids, n):
    """n greedy tokens by hand (argmax, through end-of-turn tokens too), as cpp_greedy does."""
    ids = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(model(ids).logits[0, -1].argmax().item())
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


def open_llama(path, lora=None, n_ctx=128):
    """llama.cpp on `path` (+ a LoRA adapter GGUF), with a float32 KV cache (its default is f16)."""
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp().Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx,
                             logits_all=True, n_threads=1, type_k=f32, type_v=f32, verbose=False)


# --- layouts ---------------------------------------------------------------------------------------

def test_row_permutation_turns_half_rotation_into_pair_rotation():
    """transformers rotates x_i with x_{i+d/2}; llama.cpp rotates x_{2i} with x_{2i+1}. With the rows
    of W_q reordered, llama.cpp's rotation of W'x is the reordering of transformers' rotation of Wx."""
    d, theta = 8, torch.tensor([0.3, 1.1, 2.0, 0.7])  # one head, 4 frequencies (angles at some position)
    w = torch.randn(2 * d, 5)  # 2 heads
    x = torch.randn(5)
    cos, sin = theta.cos(), theta.sin()

    def hf_rotate(q):  # (d,): pairs (i, i + d/2)
        a, b = q[:d // 2], q[d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def cpp_rotate(q):  # (d,): pairs (2i, 2i + 1)
        a, b = q[0::2], q[1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(-1)

    hf = torch.cat([hf_rotate(h) for h in (w @ x).split(d)])
    cpp = torch.cat([cpp_rotate(h) for h in (permute_rotary_rows(w, 2) @ x).split(d)])
    # attention scores are dot products: the same for any common reordering of q and k
    torch.testing.assert_close(permute_rotary_rows(hf[:, None], 2)[:, 0], cpp)
    assert torch.equal(unpermute_rotary_rows(permute_rotary_rows(w, 2), 2), w)
    assert permute_rotary_rows(torch.arange(8.0), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_pre_tokenizer_names():
    spec = json.loads(bpe_tokenizer().backend_tokenizer.to_str())
    assert pre_tokenizer_name(spec) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(ValueError, match="supported: gpt-2, smollm"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_tokenizer_kinds_and_their_refusals():
    from lorakit.gguf_export import space_prefix, tokenizer_kind

    sentencepiece = {"model": {"type": "BPE", "byte_fallback": True},
                     "decoder": {"type": "Sequence", "decoders": [
                         {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}]}}
    assert tokenizer_kind(json.loads(bpe_tokenizer().backend_tokenizer.to_str())) == "gpt2"
    assert tokenizer_kind(sentencepiece) == "llama"
    with pytest.raises(ValueError) as e:
        tokenizer_kind({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}})
    assert str(e.value) == ("tokenizer model 'Unigram' with decoder 'Metaspace' cannot be written to GGUF: supported "
                            "are byte-level BPE (SmolLM2, Llama 3, Qwen2) and SentencePiece BPE with byte fallback "
                            "(Llama 2, Mistral 7B)")
    # Llama 2's own tokenizer.json: a Prepend normalizer; transformers' converter: a Metaspace pre-tokenizer
    assert space_prefix({"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}})
    assert not space_prefix({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never", "split": False}})
    with pytest.raises(ValueError, match="split=true cuts the text at every space"):
        space_prefix({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "always", "split": True}})


# --- llama.cpp runs the export ---------------------------------------------------------------------

@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_llama_cpp_runs_the_f32_and_f16_exports(tmp_path, kind, tie):
    tokenizer = bpe_tokenizer()
    vocab = len(tokenizer)
    model = adapted(tiny(kind, vocab, tie=tie))
    ids = ids_of(tokenizer)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    greedy = hf_greedy(model, ids, 8)
    f32, check = export_merged(model, tokenizer, tmp_path / "m-f32.gguf", "f32")
    assert check.max_abs < 1e-4 and check.top1 == 1.0
    f16, _ = export_merged(adapted(tiny(kind, vocab, tie=tie)), tokenizer, tmp_path / "m-f16.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-f32.gguf"]  # no temporary left

    llm = open_llama(f32)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids  # the file's own tokenizer
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    got = cpp_logits(llm, ids)
    assert (got - expected).abs().max().item() < 1e-4
    assert cpp_greedy(llm, ids, 8) == greedy
    llm.close()

    llm = open_llama(f16)
    got = cpp_logits(llm, ids)
    # f16 weights, and f16 activations in llama.cpp's matmuls: within the f16 merge-check tolerance
    # (measured: 0.05 on logits of magnitude ~4)
    assert (got - expected).abs().max().item() < TOLERANCES["f16"][0], (got - expected).abs().max().item()
    assert cpp_greedy(llm, ids, 8) == greedy
    llm.close()


# Texts for the SentencePiece tokenizer: a character it never saw (byte fallback), runs of spaces,
# newlines and tabs, single digits, and a leading space.
SPM_TEXTS = [TEXT, "Ünïcödé naïve café 東京 ☃", "line\nbreak\ttab  two   spaces", "x 1234 y", " a leading space"]


def spm_tokenizer(directory):
    """A Llama 2 style tokenizer: SentencePiece BPE with byte fallback trained here (~0.1 s), loaded
    by transformers from tokenizer.model as Llama 2's is (legacy=True, BOS added)."""
    import io

    import sentencepiece
    from transformers import LlamaTokenizerFast

    model = io.BytesIO()
    corpus = [TEXT, "What is the capital of France? Paris, it is.", "user assistant system",
              "Ünïcödé naïve café 東京", "line\nbreak\ttab"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=360, byte_fallback=True,
        character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizerFast.from_pretrained(directory, legacy=True, add_bos_token=True, chat_template=CHATML)


def test_merge_scores_fall_with_the_merge_rank():
    from lorakit.gguf_export import merge_scores

    vocab = {"a": 3, "b": 4, "c": 5, "ab": 6, "bc": 7, "abc": 8}
    # "abc" is made by two merges; its score is the first one's rank
    assert merge_scores(["b c", ["a", "b"], "a bc", "ab c"], vocab) == {7: -0.0, 6: -1.0, 8: -2.0}


def test_llama_cpp_runs_a_sentencepiece_export(tmp_path):
    """Llama 2 / Mistral 7B vocabularies (Mistral is llama.cpp's "llama" architecture: tested
    above): llama.cpp's "llama" tokenizer model on the file's scores, byte tokens and space prefix
    gives SentencePiece's and transformers' ids, and the model its logits and greedy tokens."""
    import gguf
    import sentencepiece

    tokenizer = spm_tokenizer(tmp_path / "tokenizer")
    model = adapted(tiny("llama", len(tokenizer)))
    ids = ids_of(tokenizer)
    assert ids[0] == tokenizer.bos_token_id == 1
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    greedy = hf_greedy(model, ids, 8)
    path, check = export_merged(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert check.passed

    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types.count(gguf.TokenType.BYTE) == 256 and types[:3] == [gguf.TokenType.UNKNOWN] + 2 * [
        gguf.TokenType.CONTROL]

    llm = open_llama(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer" / "tokenizer.model"))
    for text in SPM_TEXTS:  # the tokenizer the model was trained with
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == [1] + sp.encode(text), text
    # transformers' (special tokens inside the text too). Not on a leading space: transformers'
    # Metaspace puts no "▁" before a text that starts with a space, SentencePiece and llama.cpp do
    for text in SPM_TEXTS[:-1] + ["<s>Hello</s>world"]:
        expected_ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected_ids, text
        assert llm.detokenize(expected_ids).decode() == tokenizer.decode(expected_ids, skip_special_tokens=True), text
    assert any(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(tokenizer(SPM_TEXTS[1])["input_ids"]))
    got = cpp_logits(llm, ids)
    assert (got - expected).abs().max().item() < TOLERANCES["f16"][0], (got - expected).abs().max().item()
    assert cpp_greedy(llm, ids, 8) == greedy
    llm.close()

    # a second reader: transformers' GGUF loader gives the same ids on plain text (with special
    # tokens inside the text its GGUF tokenizer differs from its own) and the merge check's logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name, local_files_only=True)
    reread = AutoTokenizer.from_pretrained(tmp_path, **kwargs)
    assert [reread(t)["input_ids"] for t in SPM_TEXTS[:-1]] == [tokenizer(t)["input_ids"] for t in SPM_TEXTS[:-1]]
    with torch.no_grad():  # `model` holds the f16-decoded weights now (the merge check loaded them)
        reread = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **kwargs)
        assert torch.allclose(reread(torch.tensor([ids])).logits[0], model(torch.tensor([ids])).logits[0], atol=1e-5)


def rope_llama(vocab, rope: dict, kind: str = "llama"):
    """A tiny Llama (or Qwen2; head dim 8: frequencies 1, 0.1, 0.01, 0.001) whose rotary embeddings
    are `rope`, for 256 positions; the same weights for any `rope`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config, model = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    return model(config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        rope_parameters={"rope_theta": 10000.0, **rope})).eval()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def test_llama3_rope_factors_divide_the_frequencies_as_transformers():
    """Wavelengths 2π/ω = 6.3, 63, 628, 6283 against L/β = 16 and L/α = 64: kept, blended with
    γ = (64/(2π/0.1) - 1)/3, stretched by s = 8 (twice)."""
    from lorakit.gguf_export import llama3_rope_factors

    model = rope_llama(96, LLAMA3_ROPE)
    factors = llama3_rope_factors(model.config)
    gamma = (64 / (2 * np.pi / 0.1) - 1) / 3
    torch.testing.assert_close(factors, torch.tensor([1.0, 1 / ((1 - gamma) / 8 + gamma), 8.0, 8.0]))
    omega = 10000.0 ** -(torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(omega / model.model.rotary_emb.inv_freq, factors)


LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("kind,rope", [("llama", LLAMA3_ROPE), ("llama", LINEAR_ROPE), ("qwen2", LINEAR_ROPE)],
                         ids=["llama3", "linear", "qwen2-linear"])
def test_llama_cpp_runs_rope_scaled_exports(tmp_path, kind, rope):
    """Llama 3.1's rope scaling (a rope_freqs tensor) and linear scaling (llama.cpp's rope scaling
    keys, on Llama and Qwen2): llama.cpp's logits equal the adapted model's over 200 positions,
    where the scaling changes the logits by more than 5."""
    import gguf

    tokenizer = bpe_tokenizer()
    ids = ids_of(tokenizer, " ".join([TEXT] * 12))[:200]
    assert len(ids) == 200
    model = adapted(rope_llama(len(tokenizer), rope, kind))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        unscaled = adapted(rope_llama(len(tokenizer), {"rope_type": "default"}, kind))(torch.tensor([ids])).logits[0]
    assert (unscaled - expected).abs().max().item() > 5.0  # the scaling matters on this prompt (measured ~10)
    path, _ = export_merged(model, tokenizer, tmp_path / "m.gguf", "f32")
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert ("rope_freqs.weight" in names) == (rope["rope_type"] == "llama3")
    llm = open_llama(path, n_ctx=256)
    got = cpp_logits(llm, ids)
    llm.close()
    assert (got - expected).abs().max().item() < 1e-4, (got - expected).abs().max().item()  # measured 2.3e-5


def test_unsupported_rope_scaling_is_a_clear_error():
    from lorakit.gguf_export import architecture

    model = rope_llama(96, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(ValueError) as e:
        architecture(model.config)
    assert str(e.value) == ("rope scaling 'yarn' on llama cannot be exported to GGUF; supported: default, linear, "
                            "llama3")


def test_transformers_reads_the_f16_export(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = bpe_tokenizer()
    model = adapted(tiny("llama", len(tokenizer)))
    ids = ids_of(tokenizer)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    path, _ = export_merged(model, tokenizer, tmp_path / "m.gguf", "f16")
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **kwargs).eval()
    assert AutoTokenizer.from_pretrained(tmp_path, **kwargs)(TEXT)["input_ids"] == ids
    with torch.no_grad():
        got = reread(torch.tensor([ids])).logits[0]
    # `model` now holds the f16-decoded weights (the merge check loads them): transformers' reader
    # must give exactly its logits, and the adapter's within the f16 tolerance
    with torch.no_grad():
        assert torch.allclose(got, model(torch.tensor([ids])).logits[0], atol=1e-5)
    assert (got - expected).abs().max().item() < TOLERANCES["f16"][0]


@pytest.mark.parametrize("quant,max_abs", [("q8_0", 0.6), ("q4_0", 0.6)])  # measured 0.28, 0.23
def test_llama_cpp_runs_quantized_exports(tmp_path, quant, max_abs):
    """llama.cpp reads q8_0/q4_0 bytes as our decoder does: its logits equal transformers' on the
    decoded weights up to llama.cpp's own rounding of activations (q8_0 for these matmuls). (The
    merge check's quantized bounds are for real models: tests marked slow.)"""
    from lorakit import merge_and_unload
    from lorakit.gguf_export import decode, model_tensors

    tokenizer = bpe_tokenizer()
    ids = ids_of(tokenizer)
    path, check = export_merged(adapted(tiny("llama", len(tokenizer))), tokenizer, tmp_path / "m.gguf", quant,
                                check=False)
    assert check is None
    model = merge_and_unload(adapted(tiny("llama", len(tokenizer))))
    model.load_state_dict(decode(model_tensors(model, quant), model.config))
    with torch.no_grad():
        decoded = model(torch.tensor([ids])).logits[0]
    llm = open_llama(path)
    got = cpp_logits(llm, ids)
    llm.close()
    assert (got - decoded).abs().max().item() < max_abs, (got - decoded).abs().max().item()
    assert (got.argmax(-1) == decoded.argmax(-1)).float().mean().item() >= 0.9


def test_llama_cpp_applies_the_adapter_only_export_on_the_base(tmp_path):
    tokenizer = bpe_tokenizer()
    vocab = len(tokenizer)
    base, _ = export_merged(tiny("llama", vocab), tokenizer, tmp_path / "base.gguf", "f32")
    model = adapted(tiny("llama", vocab), targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                    rank_pattern={"gate_proj": 2})
    lora = export_adapter(model, tmp_path / "lora.gguf")
    ids = ids_of(tokenizer)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    llm = open_llama(base, lora=lora)
    got = cpp_logits(llm, ids)
    llm.close()
    assert (got - expected).abs().max().item() < 1e-4, (got - expected).abs().max().item()
    import gguf

    alpha = gguf.GGUFReader(lora).fields["adapter.lora.alpha"].contents()
    assert alpha == 8.0  # alpha / r is the same 2.0 for r=4 and r=2


# --- the merge check and the command ---------------------------------------------------------------

def saved(tmp_path, model, tokenizer):
    """(base dir, adapter dir) on disk for the command line."""
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def test_cli_export_fails_the_merge_check_on_a_wrong_tensor_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import lorakit.gguf_export as ge

    tokenizer = bpe_tokenizer()
    base = saved(tmp_path, tiny("llama", len(tokenizer)), tokenizer)
    adapter = tmp_path / "adapter"
    save_adapter(adapted(tiny("llama", len(tokenizer))), adapter)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", str(adapter), "--base", str(base), "--out", str(out / "ok.gguf")]) == 0
    assert "merge check: max |Δlogit|" in capsys.readouterr().out

    real = ge.model_tensors

    def corrupted(model, quant="f16", progress=None):  # one wrong merged tensor: W_v of layer 1 doubled
        tensors = real(model, quant, progress)
        t = next(t for t in tensors if t.name == "blk.1.attn_v.weight")
        t.data = t.data * 2
        return tensors
    monkeypatch.setattr(ge, "model_tensors", corrupted)
    assert main(["export", str(adapter), "--base", str(base), "--out", str(out / "bad.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert err.startswith("lorakit export: error: merge check: max |Δlogit| ") and "nothing was written" in err
    assert sorted(p.name for p in out.iterdir()) == ["ok.gguf"]
    # --no-check writes it anyway
    assert main(["export", str(adapter), "--base", str(base), "--out", str(out / "bad.gguf"), "--no-check"]) == 0
    assert (out / "bad.gguf").is_file()


def merged_twice(monkeypatch):
    """Make merge_and_unload add ΔW twice (as merging into an already merged base does)."""
    import lorakit.inject as inject

    real = inject.merge_and_unload

    def wrong(model, dtype=None, requantize=False):
        for _, layer in inject.lora_layers(model):
            layer.merge()
            layer.merged_adapters = []  # forget it: the next merge adds ΔW again
        return real(model, dtype, requantize)
    monkeypatch.setattr(inject, "merge_and_unload", wrong)


def test_merge_check_fails_a_merge_into_wrong_weights(tmp_path, monkeypatch):
    """The float32 stage fails a wrong merge before anything is encoded, even for q4_0 (whose own
    tolerance is wide)."""
    merged_twice(monkeypatch)
    tokenizer = bpe_tokenizer()
    with pytest.raises(MergeCheckError, match=r"^merge check: max \|Δlogit\| .* \(float32: tolerance max "
                                              r"\|Δlogit\| <= 0.005, top-1 >= 99%\): the merged model does not"):
        export_merged(adapted(tiny("llama", len(tokenizer))), tokenizer, tmp_path / "m.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


def test_cli_merge_checks_the_merge(tmp_path, capsys, monkeypatch):
    tokenizer = bpe_tokenizer()
    base = saved(tmp_path, tiny("llama", len(tokenizer)), tokenizer)
    save_adapter(adapted(tiny("llama", len(tokenizer))), tmp_path / "adapter")
    args = ["merge", "--adapter", str(tmp_path / "adapter"), "--model", str(base)]
    assert main(args + ["--out", str(tmp_path / "ok")]) == 0
    from lorakit.merge_check import BUILTIN_TEXTS

    line = capsys.readouterr().out.splitlines()[-2]
    tokens = sum(len(ids_of(tokenizer, t)) for t in BUILTIN_TEXTS)
    assert line.startswith("merge check: max |Δlogit| ") and line.endswith(
        f"top-1 agreement 100.0% over {tokens} tokens (float32: tolerance max |Δlogit| <= 0.005, top-1 >= 99%)")
    merged_twice(monkeypatch)
    assert main(args + ["--out", str(tmp_path / "bad")]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(args + ["--out", str(tmp_path / "bad"), "--no-check"]) == 0


@pytest.mark.parametrize("path", ["lora", "qlora", "full"])
def test_merge_check_passes_on_every_path(tmp_path, path):
    from lorakit.models import load_model

    tokenizer = bpe_tokenizer()
    base = saved(tmp_path, tiny("llama", len(tokenizer)), tokenizer)
    if path == "full":
        model, _ = load_model(base)
    else:
        model, _ = load_model(base, quantize="nf4" if path == "qlora" else None)
        adapted(model)
    _, check = export_merged(model, tokenizer, tmp_path / "m.gguf", "f16")
    from lorakit.merge_check import BUILTIN_TEXTS

    assert check.passed and check.tokens == sum(len(ids_of(tokenizer, t)) for t in BUILTIN_TEXTS)
    assert check.max_abs < TOLERANCES["f16"][0] / 5


def test_merge_check_error_names_numbers_and_tolerance():
    from lorakit.merge_check import compare, require

    ref = [torch.tensor([[0.0, 1.0], [2.0, 0.0]])]
    got = [torch.tensor([[0.0, 1.5], [0.0, 2.0]])]
    result = compare(ref, got, "f16")
    assert (result.max_abs, result.top1, result.tokens) == (2.0, 0.5, 2)
    with pytest.raises(MergeCheckError, match=r"^merge check: max \|Δlogit\| 2, top-1 agreement 50.0% over 2 tokens "
                                              r"\(f16: tolerance max \|Δlogit\| <= 0.25, top-1 >= 97%\)"):
        require(result)


def test_cli_export_bad_inputs_are_clear_errors(tmp_path, capsys, monkeypatch):
    import lorakit.gguf_export as ge
    from conftest import tiny_gpt2

    tokenizer = bpe_tokenizer()
    base = saved(tmp_path, tiny("llama", len(tokenizer)), tokenizer)
    adapter = tmp_path / "adapter"
    save_adapter(adapted(tiny("llama", len(tokenizer))), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    def error(*argv):
        assert main(["export", *argv]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert error(str(adapter), "--out", str(tmp_path / "x.gguf")) == (
        f"lorakit export: error: adapter {adapter}: its base model 'meta-llama/Llama-3.2-1B' is not a local "
        "model directory; pass --base MODEL_DIR (a transformers directory with config.json)")
    assert error(str(adapter), "--base", str(base), "--out", str(tmp_path / "missing" / "x.gguf")) == (
        f"lorakit export: error: output {tmp_path / 'missing' / 'x.gguf'}: directory {tmp_path / 'missing'} "
        "does not exist")
    monkeypatch.setattr(ge.os, "access", lambda path, mode: False)
    assert error(str(adapter), "--base", str(base), "--out", str(tmp_path / "x.gguf")).endswith(
        f"directory {tmp_path} is not writable")
    monkeypatch.undo()
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    assert error(str(gpt2), "--out", str(tmp_path / "x.gguf")) == (
        "lorakit export: error: model_type 'gpt2' cannot be exported to GGUF; supported: llama, mistral, qwen2 "
        "(Llama 2/3, SmolLM2, Mistral, Qwen2)")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # corrupt: truncated
    assert "adapter_model.safetensors" in error(str(adapter), "--base", str(base), "--out", str(tmp_path / "x.gguf"))
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_adapter_only_refuses_what_llama_cpp_cannot_apply():
    tokenizer = bpe_tokenizer()
    model = adapted(tiny("llama", len(tokenizer), tie=True), targets=["q_proj", "lm_head"],
                    modules_to_save=["model.norm"])
    from lorakit.gguf_export import adapter_tensors

    with pytest.raises(ValueError) as e:
        adapter_tensors(model)
    assert str(e.value) == (
        "this adapter cannot be written as a llama.cpp LoRA adapter: model.norm: modules_to_save (a full copy of "
        "the module); lm_head: LoRA on a tied output head (the base GGUF has no output.weight). Supported: LoRA on "
        "linear layers of the attention and MLP (export the merged model instead)")



def dora_adapted(vocab):
    """A tiny Llama with an all-linear DoRA adapter whose B and magnitudes are random, so that both
    the low-rank update and the rescaling g = m / ||W + ΔW|| change the logits."""
    from lorakit.inject import lora_layers

    model = adapted(tiny("llama", vocab), dora=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            m = layer.lora_magnitude_vector["default"]
            m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))
    return model


def test_adapter_only_refuses_dora_and_names_the_merged_export():
    from lorakit.gguf_export import adapter_tensors

    with pytest.raises(ValueError) as e:
        adapter_tensors(dora_adapted(96))
    assert str(e.value) == (
        "this adapter cannot be written as a llama.cpp LoRA adapter: DoRA on 14 modules (model.layers.0.self_attn."
        "q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, ...): llama.cpp's LoRA GGUF has "
        "no magnitude vector, so DoRA's m would be dropped. Supported: LoRA on linear layers of the attention and "
        "MLP (export the merged model instead)")


def test_merged_dora_export_holds_the_merged_weights_and_llama_cpp_runs_it(tmp_path):
    import copy

    import gguf

    from lorakit import merge_and_unload
    from lorakit.gguf_export import model_tensors
    from lorakit.inject import lora_layers

    tokenizer = bpe_tokenizer()
    model = dora_adapted(len(tokenizer))
    ids = ids_of(tokenizer)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        plain_lora = copy.deepcopy(model)  # the same A and B without the magnitudes: what dropping m gives
        for _, layer in lora_layers(plain_lora):
            layer.lora_magnitude_vector.pop("default")
        assert (plain_lora(torch.tensor([ids])).logits[0] - expected).abs().max() > 0.1
    merged = merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    reference = {t.name: t.data for t in model_tensors(merged, "f32")}

    path, check = export_merged(model, tokenizer, tmp_path / "dora.gguf", "f32")
    assert check.max_abs < 1e-4 and check.top1 == 1.0
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    assert written.keys() == reference.keys() and len(written) == 2 * 9 + 3  # 9 tensors per block
    for name, data in reference.items():
        assert np.array_equal(written[name].reshape(data.shape), data), name

    llm = open_llama(path)
    got = cpp_logits(llm, ids)
    llm.close()
    assert (got - expected).abs().max().item() < 1e-4, (got - expected).abs().max().item()

# --- the real default model (SmolLM2-135M-Instruct) --------------------------------------------------

def smollm2_adapted():
    """SmolLM2 with an r=8 all-linear adapter of a trained adapter's size (B ~ N(0, 0.002²))."""
    from lorakit.models import load_model

    model, tokenizer = load_model()
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=8, alpha=16, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.002)
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_f16_export_chats_in_llama_cpp(tmp_path):
    model, tokenizer = smollm2_adapted()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    greedy = hf_greedy(model, ids, 16)
    path, check = export_merged(model, tokenizer, tmp_path / "smollm2.gguf", "f16")
    print(check.line())
    llm = open_llama(path)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    got = cpp_logits(llm, ids)
    print("llama.cpp f16 vs adapter on base: max |Δlogit|", (got - expected).abs().max().item())
    assert (got - expected).abs().max().item() < TOLERANCES["f16"][0]  # measured 0.087
    assert cpp_greedy(llm, ids, 16) == greedy
    # llama.cpp chats with nothing but the file: its chat template, its tokenizer, its end-of-turn token
    reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=16)["choices"][0]["message"]["content"]
    until_eos = greedy[:greedy.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in greedy else greedy
    assert reply == tokenizer.decode(until_eos, skip_special_tokens=True)
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_smollm2_quantized_exports_within_bounds_in_llama_cpp(tmp_path, quant):
    """llama.cpp on the q8_0/q4_0 file vs the adapter on its base (float32), on BUILTIN_TEXTS.
    llama.cpp also rounds activations to 8 bits in these matmuls, so its numbers are a little
    worse than the merge check's (measured: q8_0 max |Δlogit| 1.94, top-1 91.3%; q4_0 18.4, 67.5%;
    80 tokens, so one position is 1.25%)."""
    from lorakit.merge_check import BUILTIN_TEXTS, check_inputs, compare, logits_of

    model, tokenizer = smollm2_adapted()
    inputs = check_inputs(tokenizer, BUILTIN_TEXTS)
    reference = logits_of(model, inputs)
    path, _ = export_merged(model, tokenizer, tmp_path / "m.gguf", quant)
    llm = open_llama(path)
    got = [cpp_logits(llm, ids[0].tolist()) for ids in inputs]
    llm.close()
    result = compare(reference, got, quant)
    print("llama.cpp", result.line())
    max_abs, top1 = {"q8_0": (6.0, 0.85), "q4_0": (40.0, 0.50)}[quant]
    assert result.max_abs <= max_abs and result.top1 >= top1


def test_inspect_serving_lists_what_vllm_refuses(tmp_path, capsys):
    tokenizer = bpe_tokenizer()
    model = adapted(tiny("llama", len(tokenizer)), r=32, modules_to_save=["model.norm"])
    save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--serving", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["serving"] == [
        "vLLM: modules_to_save ['model.norm'] is refused (only None is supported); merge the adapter "
        "(lorakit merge / lorakit export) to serve it",
        "vLLM: rank 32 is above the default --max-lora-rank 16; start vLLM with --max-lora-rank 32",
        "LoRAX: loads the adapter but ignores modules_to_save ['model.norm']: it would answer differently from the "
        "adapter trained"]
    save_adapter(adapted(tiny("llama", len(tokenizer), seed=2), r=8), tmp_path / "b")
    assert main(["inspect", str(tmp_path / "b"), "--serving"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("serving (vLLM, SGLang, LoRAX): nothing known to stop it")
