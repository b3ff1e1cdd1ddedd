"""Greedy generation speed: capjax (KV cache, jitted while_loop) vs transformers `generate`.

Same SmolLM2-135M-Instruct weights (dequantized GGUF, float32), same 8 chat prompts in one
left-padded batch, greedy, up to 64 new tokens. Prints both rates (new tokens up to EOS per
second, wall clock), their ratio, and whether the outputs are identical token for token.
capjax's first call (compilation) is timed separately; the rate is from a second call.

    python scripts/bench_eval.py [--new-tokens 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import time

QUESTIONS = [
    "What is 12 + 30?",
    "Name three primary colors.",
    "Why is the sky blue? Answer in one sentence.",
    "Tom has 5 apples and buys 7 more. How many apples does he have?",
    "Write a haiku about autumn.",
    "What is the capital of Japan?",
    "Explain what a prime number is.",
    "List two uses of copper.",
    "What does a CPU do?",
    "Translate 'good morning' to French.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    import capjax
    from capjax.evaluate import generate
    from capjax.io import smollm2_gguf_path

    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    p = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = set(model.config.eos_ids)
    B, N = len(ids), args.new_tokens

    t0 = time.perf_counter()
    generate(model, params, ids, N, batch_size=B)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = generate(model, params, ids, N, batch_size=B)
    ours_s = time.perf_counter() - t0

    tok.padding_side = "left"
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
    hf_s = time.perf_counter() - t0
    theirs = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        cut = [i for i, t in enumerate(row) if t in eos]
        theirs.append(row[: cut[0]] if cut else row)

    n_ours, n_theirs = sum(map(len, ours)), sum(map(len, theirs))
    print(
        f"device: {jax.devices()[0].platform}, torch threads: {torch.get_num_threads()}, "
        f"{B} prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens), max {N} new tokens, float32"
    )
    print(
        f"capjax:       {n_ours} tokens in {ours_s:.2f} s = {n_ours / ours_s:8.1f} tok/s "
        f"(first call incl. compile: {compile_s:.2f} s)"
    )
    print(f"transformers: {n_theirs} tokens in {hf_s:.2f} s = {n_theirs / hf_s:8.1f} tok/s")
    print(f"ratio capjax/transformers: {(n_ours / ours_s) / (n_theirs / hf_s):.2f}x")
    same = ours == theirs
    print(
        f"identical outputs: {same}"
        + ("" if same else f" ({sum(a == b for a, b in zip(ours, theirs))}/{B} rows equal)")
    )
    print(f"sample: {tok.decode(ours[0])!r}")


if __name__ == "__main__":
    main()
