"""`lorakit eval --data FILE`: held-out loss and exact match of a model (+ adapter) on a data file; on
preference data (prompt, chosen, rejected), the held-out pair accuracy and mean log-probabilities."""

from __future__ import annotations

import json

from lorakit.cli.common import add_model_arguments, load, positive_int, resolve_source


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and exact match on a data file",
                       description="Score a base model (with an optional adapter) on a data file: mean loss per "
                                   "completion token, perplexity, and greedy exact match where records have "
                                   "references. On preference records (prompt, chosen, rejected): pair accuracy, "
                                   "the fraction of pairs whose chosen answer has the higher log-probability, and "
                                   "the mean log-probabilities of both answers. Data formats as in `lorakit "
                                   "train`; builtin:<task> scores a built-in task's test split.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help=".jsonl/.json/.csv file, or builtin:<task>")
    p.add_argument("--format", default="auto")
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N records")
    p.set_defaults(run=run)


def run(args) -> int:
    import math

    from lorakit.data import build_dataset, read_data
    from lorakit.preference_data import is_preference
    from lorakit.training.evaluate import exact_match_accuracy, heldout_loss, pair_scores

    records = read_data(args.data, "test")  # a file, or a built-in task's test split
    records = records[:args.limit]
    if not records:
        raise ValueError(f"--data {args.data}: no records to score")
    for record in records:
        answer = record.fields.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{record.source}: answer={answer!r} must be a string (the reference the "
                             "model's reply is compared with)")
    model, tokenizer = load(resolve_source(args))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = build_dataset(records, tokenizer, args.format, args.max_length)
    if is_preference(data):
        scores = pair_scores(model, data, tokenizer.pad_token_id, args.batch_size)
    else:
        loss = heldout_loss(model, data, tokenizer.pad_token_id, args.batch_size)
        scores = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    accuracy, rows = exact_match_accuracy(model, tokenizer, data, args.max_new_tokens, args.batch_size)
    report = {"records": len(records), **scores,
              "exact_match": None if math.isnan(accuracy) else accuracy, "scored": len(rows)}
    print(json.dumps(report, indent=2))
    return 0
