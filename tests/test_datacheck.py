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


# --- preference pairs (data.format preference): each check on both sequences of a pair, or on the pairs ---

def pairs(rows, prefix="p"):
    return [Record({"prompt": p, "chosen": c, "rejected": r}, f"{prefix}:{i}") for i, (p, c, r) in enumerate(rows)]


def clean_pairs(n=6, prefix="p", start=0):
    return pairs([(f"Q{i}: what?", f"A{i}", f"B{i}") for i in range(start, start + n)], prefix)


def test_clean_pairs_have_no_finding_and_their_statistics_count_both_sequences():
    report = datacheck.check(tok, build_dataset(clean_pairs(6), tok), None,
                             build_dataset(clean_pairs(2, "s", start=10), tok), samples=2)
    assert report.findings == []
    # each pair: "Q0: what?" (9) + "A0" / "B0" (2) + EOS = 12 tokens per sequence, 3 supervised each
    assert report.splits["train"] == {"examples": 6, "format": "preference", "sequences": 12,
                                      "tokens": {"min": 12, "median": 12, "p95": 12, "max": 12},
                                      "supervised_tokens": 36, "truncated": 0, "dropped_supervised_tokens": 0}
    assert report.splits["test"]["tokens"]["max"] == 14 and report.splits["test"]["sequences"] == 4
    assert report.auto_max_length == 12 and report.max_length == 256
    assert [(s["source"], s["text"], s["label_tokens"]) for s in report.samples] == [
        ("p:0 chosen", "Q0: what?[A0<|im_end|>]", 3), ("p:0 rejected", "Q0: what?[B0<|im_end|>]", 3),
        ("p:1 chosen", "Q1: what?[A1<|im_end|>]", 3), ("p:1 rejected", "Q1: what?[B1<|im_end|>]", 3)]
    assert datacheck.summary(report) == ["data check: train tokens per sequence (prompt + chosen, prompt + rejected) "
                                         "min 12 / median 12 / p95 12 / max 12; 0 error(s), 0 warning(s)"]
    text = datacheck.render_report(report)
    assert "train              6     12      12     12     12         36         0" in text
    assert "preference pairs: tokens per sequence (prompt + chosen, prompt + rejected)" in text


def test_chat_pairs_without_an_end_of_turn_token_in_the_labels_are_an_error():
    rows = [Record({"prompt": [{"role": "user", "content": f"hi{i}"}], "chosen": [{"role": "assistant", "content": "yo"}],
                    "rejected": [{"role": "assistant", "content": "no"}]}, f"c:{i}") for i in range(3)]
    assert datacheck.check(tok, build_dataset(rows, tok)).findings == []  # ChatML ends the turn with <|im_end|>
    plain = char_tokenizer()
    plain.chat_template = PLAIN_TEMPLATE
    report = datacheck.check(plain, build_dataset(rows, plain))
    assert findings(report) == [("error", "eos")]
    assert report.errors[0].message.startswith(
        "6 of 6 preference sequences (prompt + chosen, prompt + rejected) have no end-of-turn token ('<|im_end|>') "
        "among their supervised tokens")
    assert report.errors[0].examples == ["c:0 chosen", "c:0 rejected", "c:1 chosen"]


def test_pairs_in_another_templates_markers_are_a_template_mismatch():
    llama3 = pairs([(f"<|start_header_id|>user<|end_header_id|>\n\nQ{i}<|eot_id|>", f"A{i}", f"B{i}") for i in range(2)])
    report = datacheck.check(tok, build_dataset(llama3 + clean_pairs(3), tok))
    assert findings(report) == [("error", "template")]
    assert report.errors[0].message.startswith(
        "template mismatch: 4 of 10 preference sequences (prompt + chosen, prompt + rejected) use chat markers "
        "<|end_header_id|>, <|eot_id|>, <|start_header_id|> that this tokenizer does not know")


def test_truncated_pairs_count_the_dropped_tokens_and_pairs_left_without_a_preference():
    rows = pairs([("Q: ", "a" * 20, "a" * 19 + "b"), ("Q: ", "c", "d")])
    report = datacheck.check(tok, build_dataset(rows, tok, max_length=10))
    assert findings(report) == [("warning", "truncation"), ("warning", "no signal")]
    # pair 0: 3 + 21 = 24 tokens a sequence, cut at 10: 7 of 21 supervised kept, 14 dropped, twice;
    # pair 1: 3 + 2 tokens, 2 supervised each: 28 of 7 + 7 + 2 + 2 + 28 = 46 dropped (60.9%)
    truncation, no_signal = report.warnings
    assert truncation.message == (
        "HEAVY TRUNCATION: data.max_length=10 cuts 2 of 4 training preference sequences (prompt + chosen, prompt + "
        "rejected) and drops 28 of their 46 supervised tokens (60.9%), which are never learned; set "
        "data.max_length=auto (here 24: the longest example) or a larger number")
    assert truncation.examples == ["p:0 chosen", "p:0 rejected"]
    # "Q: aaaaaaa" both: the answers differ in their 20th letter, cut away
    assert no_signal.message.startswith("1 of 2 training pairs are the same sequence after data.max_length=10 cuts "
                                        "them") and no_signal.examples == ["p:0"]
    assert report.splits["train"]["truncated"] == 1 and report.splits["train"]["dropped_supervised_tokens"] == 28
    assert report.auto_max_length == 24
    assert datacheck.check(tok, build_dataset(rows, tok, max_length=24)).findings == []
    only = datacheck.check(tok, build_dataset(rows[:1], tok, max_length=10))  # every pair without a signal
    assert findings(only) == [("warning", "truncation"), ("error", "no signal")]


def test_duplicate_pairs_are_warnings():
    rows = clean_pairs(4) + pairs([("Q1: what?", "A1", "B1"), ("q2 WHAT ?", "A2", "B2"), ("Q3: what?", "A3", "C3")],
                                  "d")
    report = datacheck.check(tok, build_dataset(rows, tok))
    assert findings(report) == [("warning", "duplicates"), ("warning", "duplicates")]
    exact, near = report.warnings
    assert exact.message.startswith("1 training pairs are exact copies") and exact.examples == ["d:0 = p:1"]
    assert near.message.startswith("1 training pairs are near-copies") and near.examples == ["d:1 ~ p:2"]


def test_test_pairs_with_a_training_prompt_are_leakage():
    train = build_dataset(clean_pairs(6), tok)
    test = build_dataset(pairs([("Q4: what?", "X", "Y"), ("Q5: what?", "A5", "B5")], "s") + clean_pairs(2, "s2", 20), tok)
    report = datacheck.check(tok, train, None, test)
    assert findings(report) == [("error", "leakage")]
    assert report.errors[0].message.startswith("2 of 4 test pairs (50.0%) also appear in the training data")
    assert report.errors[0].examples == ["s:0 = p:4", "s:1 = p:5"]
    assert findings(datacheck.check(tok, train, build_dataset(clean_pairs(1, "v"), tok), None, max_leakage=1)) == \
        [("warning", "leakage")]
