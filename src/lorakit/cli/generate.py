"""`lorakit generate` and `lorakit chat`: text from a base model with an adapter."""

from __future__ import annotations

import sys

from lorakit.cli.common import add_model_arguments, load, positive_int, resolve_source, temperature


def add_parser(sub) -> None:
    for name, help_text in (("generate", "continue or answer one prompt"), ("chat", "an interactive chat")):
        p = sub.add_parser(name, help=help_text, description=f"{help_text.capitalize()} with a base model "
                           "and (optionally) an adapter; greedy decoding unless --temperature > 0.")
        add_model_arguments(p)
        if name == "generate":
            p.add_argument("prompt", help="the prompt (rendered with the chat template unless --raw)")
            p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
        p.add_argument("--system", help="a system message")
        p.add_argument("--max-new-tokens", type=positive_int, default=128)
        p.add_argument("--temperature", type=temperature, default=0.0,
                       help="0: greedy decoding (default); > 0: sample at this temperature")
        p.set_defaults(run=run_generate if name == "generate" else run_chat)


def _reply(model, tokenizer, prompt: str, args) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _render(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use `lorakit generate --raw`")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_generate(args) -> int:
    model, tokenizer = load(resolve_source(args))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    prompt = args.prompt if args.raw else _render(tokenizer, messages)
    print(_reply(model, tokenizer, prompt, args))
    return 0


def run_chat(args) -> int:
    model, tokenizer = load(resolve_source(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; an empty line or Ctrl-D ends the chat", file=sys.stderr)
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply = _reply(model, tokenizer, _render(tokenizer, messages), args)
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0
