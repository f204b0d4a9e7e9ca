import datetime

import pytest

from lorakit.tasks import (
    DEFAULT_TASK,
    ZORBISH_ADJECTIVES,
    ZORBISH_NOUNS,
    ZORBISH_VERBS,
    accuracy,
    chatml_prompt,
    exact_match,
    make_task,
    normalize,
    stardate_pairs,
    zorbish_pairs,
)


def test_default_task_is_stardate():
    assert DEFAULT_TASK == "stardate"
    assert make_task().name == "stardate"


def test_stardate_universe_size_and_hand_examples():
    pairs = dict(stardate_pairs())
    # 1900..2099: 200 years of 365 days plus 49 leap days (1904..2096 every 4 years, 1900 excluded).
    assert len(pairs) == 200 * 365 + 49 == 73049
    assert pairs["2024-07-19"] == "19.VII.2024"
    assert pairs["2000-02-29"] == "29.II.2000"
    assert pairs["1999-12-31"] == "31.XII.1999"
    assert pairs["1900-01-01"] == "01.I.1900"
    assert pairs["2099-04-09"] == "09.IV.2099"
    assert "1900-02-29" not in pairs


def test_stardate_rule_holds_for_every_pair():
    roman = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII", 9: "IX", 10: "X", 11: "XI", 12: "XII"}
    for iso, star in stardate_pairs():
        d = datetime.date.fromisoformat(iso)
        assert star == f"{d.day:02d}.{roman[d.month]}.{d.year}"


def test_records_are_chatml_with_end_of_turn_completion():
    record = make_task("stardate", n_train=1, n_test=1, seed=0).test[0]
    # Pinned: the first test record of seed 0. A change here changes every reported number.
    assert record == {
        "prompt": "<|im_start|>system\nConvert the date to stardate format.<|im_end|>\n"
        "<|im_start|>user\n1965-05-10<|im_end|>\n<|im_start|>assistant\n",
        "completion": "10.V.1965<|im_end|>",
        "answer": "10.V.1965",
    }
    assert record["prompt"] == chatml_prompt("Convert the date to stardate format.", "1965-05-10")


@pytest.mark.parametrize("name", ["stardate", "zorbish"])
def test_generator_is_deterministic_and_seeded(name):
    a = make_task(name, n_train=300, n_test=50, seed=0)
    b = make_task(name, n_train=300, n_test=50, seed=0)
    c = make_task(name, n_train=300, n_test=50, seed=1)
    assert a == b
    assert a.test != c.test


@pytest.mark.parametrize("name", ["stardate", "zorbish"])
def test_splits_are_disjoint_and_test_split_does_not_depend_on_n_train(name):
    small = make_task(name, n_train=100, n_test=200, seed=3)
    large = make_task(name, n_train=2000, n_test=200, seed=3)
    assert (len(large.train), len(large.test)) == (2000, 200)
    assert small.test == large.test
    assert small.train == large.train[:100]
    train_prompts = {r["prompt"] for r in large.train}
    test_prompts = {r["prompt"] for r in large.test}
    assert len(train_prompts) == 2000 and len(test_prompts) == 200  # no duplicates within a split
    assert not train_prompts & test_prompts


def test_zorbish_rule_and_every_test_word_is_taught_in_training():
    pairs = dict(zorbish_pairs())
    assert len(pairs) == 12 * 16 * 12 == 2304
    assert pairs["big dog runs"] == "kazu vash grom"  # verb first, adjective last
    assert pairs["quiet queen falls"] == "drup ruhla shu"
    zorbish_words = list(ZORBISH_ADJECTIVES.values()) + list(ZORBISH_NOUNS.values()) + list(ZORBISH_VERBS.values())
    assert len(set(zorbish_words)) == len(zorbish_words)  # the invented lexicon is unambiguous
    task = make_task("zorbish", n_train=2000, n_test=200, seed=0)
    train_words = {w for r in task.train for w in r["answer"].split()}
    assert {w for r in task.test for w in r["answer"].split()} <= train_words


def test_make_task_errors_name_the_rule():
    with pytest.raises(ValueError, match="unknown task 'dates'; built-in tasks: stardate, stardate_pairs, zorbish"):
        make_task("dates")
    with pytest.raises(ValueError, match="has 2304 examples; n_train=2200 \\+ n_test=200"):
        make_task("zorbish", n_train=2200, n_test=200)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("19.VII.2024", "19.VII.2024", True),
        ("19.VII.2024<|im_end|>", "19.VII.2024", True),
        ("19.VII.2024<|im_end|>\n<|im_start|>user\nmore", "19.VII.2024", True),  # cut at end of turn
        ("  19.VII.2024 \n", "19.VII.2024", True),  # outer whitespace
        ("kazu  vash\ngrom", "kazu vash grom", True),  # whitespace runs collapse
        ("19.vii.2024", "19.VII.2024", False),  # case matters
        ("19.VII.2024.", "19.VII.2024", False),  # punctuation matters
        ("19.VII.2024 is the stardate", "19.VII.2024", False),
        ("", "19.VII.2024", False),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_normalize_and_accuracy():
    assert normalize(" a \t b <|im_end|> c") == "a b"
    assert accuracy(["x<|im_end|>", "y", "z ", "w"], ["x", "y", "q", "w"]) == 0.75
    with pytest.raises(ValueError, match="3 predictions for 2 answers"):
        accuracy(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
