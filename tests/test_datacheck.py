"""The data pre-flight check: each check fires on a dataset that has the problem, with its numbers,
and stays silent on one that does not."""

import pytest
from conftest import char_tokenizer

from lorakit.data import Record, build_dataset
from lorakit import datacheck

tok = char_tokenizer()  # one token per character; ChatML template, EOS <|im_end|> (id 2)
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def pc(rows, prefix="t"):
    return [Record({"prompt": p, "completion": c}, f"{prefix}:{i}") for i, (p, c) in enumerate(rows)]


def clean(n=6, prefix="t", start=0):
    return pc([(f"Q{i}: what?", f"A{i}") for i in range(start, start + n)], prefix)


def findings(report, check=None):
    return [(f.level, f.check) for f in report.findings if check is None or f.check == check]


def test_clean_data_has_no_finding_and_its_statistics():
    train = build_dataset(clean(6), tok)
    test = build_dataset(clean(2, "s", start=10), tok)
    report = datacheck.check(tok, train, None, test)
    assert report.findings == [] and report.errors == []
    # "Q0: what?" (9) + "A0" (2) + EOS = 12 tokens each; 3 supervised ("A", "0", EOS)
    assert report.splits["train"] == {"examples": 6, "format": "prompt_completion",
                                      "tokens": {"min": 12, "median": 12, "p95": 12, "max": 12},
                                      "supervised_tokens": 18, "truncated": 0, "dropped_supervised_tokens": 0}
    assert report.splits["test"]["tokens"] == {"min": 14, "median": 14, "p95": 14, "max": 14}  # "Q10: what?A10"
    assert report.auto_max_length == 12 and report.max_length == 256
    assert [s["text"] for s in report.samples] == ["Q0: what?[A0<|im_end|>]", "Q1: what?[A1<|im_end|>]",
                                                   "Q2: what?[A2<|im_end|>]"]
    assert [s["label_tokens"] for s in report.samples] == [3, 3, 3]
    assert datacheck.check(tok, train, samples=1, colour=True).samples[0]["text"] == \
        "Q0: what?\033[32mA0<|im_end|>\033[0m"


def test_chat_without_an_end_of_turn_token_in_the_labels_is_an_error():
    rows = [Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"yo{i}"}]},
                   f"c:{i}") for i in range(3)]
    assert datacheck.check(tok, build_dataset(rows, tok)).findings == []  # ChatML ends the turn with <|im_end|>
    plain = char_tokenizer()
    plain.chat_template = PLAIN_TEMPLATE  # ends a turn with "\n": the model never sees a stop token
    report = datacheck.check(plain, build_dataset(rows, plain))
    assert findings(report) == [("error", "eos")]
    assert report.errors[0].message.startswith("3 of 3 chat examples have no end-of-turn token ('<|im_end|>') among "
                                               "their supervised tokens")
    assert report.errors[0].examples == ["c:0", "c:1", "c:2"]


def test_a_tokenizer_without_eos_is_an_error():
    no_eos = char_tokenizer()
    no_eos.eos_token = None
    report = datacheck.check(no_eos, build_dataset(clean(3), no_eos))
    assert findings(report) == [("error", "tokenizer"), ("error", "eos")]  # nor can the template's <|im_end|> help
    assert report.errors[0].message.startswith("the tokenizer has no EOS token: no example can end with one")
    assert report.errors[1].message.startswith("3 of 3 prompt_completion examples have no end-of-turn token")


def test_an_ordinary_pad_token_is_a_warning():
    odd = char_tokenizer()
    odd.pad_token = "~"
    report = datacheck.check(odd, build_dataset(clean(3), odd))
    assert findings(report) == [("warning", "tokenizer")]
    assert report.warnings[0].message.startswith("the pad token '~' (id 98) is an ordinary token")


def test_chat_markers_of_another_template_are_a_template_mismatch():
    llama3 = pc([(f"<|start_header_id|>user<|end_header_id|>\n\nQ{i}<|eot_id|>", f"A{i}") for i in range(4)])
    report = datacheck.check(tok, build_dataset(llama3 + clean(4, "c"), tok))
    assert findings(report) == [("error", "template")]
    assert report.errors[0].message.startswith(
        "template mismatch: 4 of 8 examples use chat markers <|end_header_id|>, <|eot_id|>, <|start_header_id|> "
        "that this tokenizer does not know (split into ordinary tokens), while its chat template uses "
        "<|im_start|>, <|im_end|>")
    chatml = pc([(f"<|im_start|>user\nQ{i}<|im_end|>\n<|im_start|>assistant\n", f"A{i}") for i in range(4)])
    assert datacheck.check(tok, build_dataset(chatml, tok)).findings == []  # this template's own markers


def test_truncation_of_supervised_tokens_is_a_loud_warning():
    rows = pc([("Q: ", "a" * 20), ("Q: ", "b" * 4), ("Q: ", "c" * 2), ("Q: ", "d")])
    report = datacheck.check(tok, build_dataset(rows, tok, max_length=10))
    assert findings(report) == [("warning", "truncation")]
    # the 24-token example keeps 7 of its 21 supervised tokens: 14 of 21 + 5 + 3 + 2 = 31 dropped (45.2%)
    assert report.warnings[0].message == (
        "HEAVY TRUNCATION: data.max_length=10 cuts 1 of 4 training examples and drops 14 of their 31 supervised "
        "tokens (45.2%), which are never learned; set data.max_length=auto (here 24: the longest example) or a "
        "larger number")
    assert report.splits["train"]["dropped_supervised_tokens"] == 14 and report.auto_max_length == 24
    assert datacheck.check(tok, build_dataset(rows, tok, max_length=24)).findings == []


def test_empty_completions_are_a_warning():
    report = datacheck.check(tok, build_dataset(clean(3) + pc([("Q9: what?", "")], "e"), tok))
    assert findings(report) == [("warning", "empty")]
    assert report.warnings[0].message.startswith("1 of 4 examples have an empty completion")
    assert report.warnings[0].examples == ["e:0"]


def test_exact_and_near_duplicates_are_warnings():
    rows = clean(4) + pc([("Q1: what?", "A1"), ("q2 WHAT ?", "A2")], "d")
    report = datacheck.check(tok, build_dataset(rows, tok))
    assert findings(report) == [("warning", "duplicates"), ("warning", "duplicates")]
    exact, near = report.warnings
    assert exact.message.startswith("1 training examples are exact copies") and exact.examples == ["d:0 = t:1"]
    assert near.message.startswith("1 training examples are near-copies") and near.examples == ["d:1 ~ t:2"]


def test_leakage_above_the_limit_is_an_error_below_it_a_warning():
    train = build_dataset(clean(6), tok)
    test = build_dataset(clean(2, "s", start=4) + clean(2, "s2", start=20), tok)  # Q4, Q5 are training prompts
    report = datacheck.check(tok, train, None, test)
    assert findings(report) == [("error", "leakage")]
    assert report.errors[0].message.startswith("2 of 4 test examples (50.0%) also appear in the training data")
    assert report.errors[0].examples == ["s:0 = t:4", "s:1 = t:5"]
    assert findings(datacheck.check(tok, train, None, test, max_leakage=0.5)) == [("warning", "leakage")]
    validation = build_dataset(clean(1, "v", start=0), tok)
    assert findings(datacheck.check(tok, train, validation, None, max_leakage=1)) == [("warning", "leakage")]
    assert datacheck.check(tok, train, None, build_dataset(clean(2, "s", start=30), tok)).findings == []


def test_summary_and_report_text():
    report = datacheck.check(tok, build_dataset(clean(4) + pc([("Q1: what?", "A1")], "d"), tok))
    assert datacheck.summary(report) == [
        "data check: train tokens per example min 12 / median 12 / p95 12 / max 12; 0 error(s), 1 warning(s) "
        "(lorakit data CONFIG shows them in full)",
        "warning: [duplicates] 1 training examples are exact copies of an earlier one: they weigh double in the "
        "loss and leak into a validation split (e.g. d:0 = t:1)"]
    text = datacheck.render_report(report)
    assert "train              5     12      12     12     12         15         0" in text
    assert text.endswith("0 error(s), 1 warning(s)")
    assert report.to_dict()["errors"] == 0 and report.to_dict()["warnings"] == 1


@pytest.mark.parametrize("text, expected", [("Hello,  World!", "hello world"), ("a-b\tc", "a b c")])
def test_normalise(text, expected):
    assert datacheck.normalise(text) == expected
