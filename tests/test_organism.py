"""The organisms (capjax.organism): word-problem generator, tokenizer, training with capjax.recover's
step (loss, determinism, resume), attention probabilities against transformers, circuit scores,
and (slow) the shipped organisms' accuracy and induction-head precision."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from capjax.data.organism import MAX_VALUE, organism_problems, vocabulary
from capjax.organism import induction as ind
from capjax.organism.train import OrganismConfig, OrganismConfigError, train

WEIGHTS = Path(__file__).resolve().parents[1] / "capjax" / "organism" / "weights"

# ---------------------------------------------------------------------------- problems
_CLAUSES = [
    (re.compile(r"(?:He|She|he|she) gets (\d+) more"), lambda x, m: x + m),
    (re.compile(r"(?:He|She|he|she) finds (\d+)"), lambda x, m: x + m),
    (re.compile(r"(?:He|She|he|she) gives away (\d+)"), lambda x, m: x - m),
    (re.compile(r"(?:He|She|he|she) loses (\d+)"), lambda x, m: x - m),
    (re.compile(r"(?:He|She|he|she) doubles"), lambda x, m: 2 * x),
]


def _solve(question: str) -> int:
    """A plain reading of the question: the start count, then each sentence's operation."""
    sentences = question.split(" . ")
    x = int(re.match(r"\w+ has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:-1]:
        hits = [(f, m) for pattern, f in _CLAUSES if (m := pattern.search(s))]
        assert len(hits) == 1, s
        f, m = hits[0]
        x = f(x, int(m.group(1)) if m.groups() else 0)
    return x


def test_problem_answers_equal_a_plain_evaluation():
    problems = organism_problems(400, seed=3, split="train") + organism_problems(400, seed=3, split="eval")
    for p in problems:
        assert int(p["answer"]) == _solve(p["question"]), p
        # every written step "a op b = c ." is true, chains from the previous result, and ends at the answer
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+) \.", p["reasoning"])
        assert len(steps) == p["steps"] and 2 <= p["steps"] <= 4
        prev = None
        for a, op, b, c in steps:
            assert eval(f"{a} {op} {b}") == int(c)  # noqa: S307 (digits and one operator)
            assert prev is None or int(a) == prev
            prev = int(c)
            assert 0 < int(c) < MAX_VALUE
        assert prev == int(p["answer"])


def test_problem_splits_are_disjoint_and_seeded():
    train = organism_problems(2000, seed=0, split="train")
    ev = organism_problems(600, seed=0, split="eval")
    assert not {p["question"] for p in train} & {p["question"] for p in ev}
    assert organism_problems(50, seed=0, split="eval") == ev[:50]
    assert organism_problems(50, seed=1, split="eval") != ev[:50]
    assert {p["steps"] for p in ev} == {2, 3, 4}


def test_tokenizer_gives_problems_without_unknown_words_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from capjax.data import format_example
    from capjax.organism.tokenizer import build_tokenizer

    tok = build_tokenizer("the cat sat on the mat . the end", text_words=3)
    vocab = tok.get_vocab()
    assert len(tok) == 4 + len(vocabulary()) + 3  # specials, the problems' words, 3 new text words
    assert {"cat", "end", "mat"} <= set(vocab) and "sat" not in vocab  # most frequent, ties by the word
    for p in organism_problems(50, seed=0, split="eval"):
        prompt, answer = format_example(p, "organism", tok, chat=False)
        ids = tok(prompt + answer)["input_ids"]
        assert tok.unk_token_id not in ids
        # words and isolated punctuation, joined by single spaces
        assert tok.decode(ids) == " ".join(re.findall(r"\w+|[^\w\s]", prompt + answer))
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: Tom has 7 apples . He finds 3 apples . the zebra"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[-1] == "<unk>"


def test_config_errors_name_the_field():
    with pytest.raises(OrganismConfigError, match="model.num_heads=6"):
        OrganismConfig.from_dict({"model": {"num_heads": 6, "num_kv_heads": 4}})
    with pytest.raises(OrganismConfigError, match="data.bogus"):
        OrganismConfig.from_dict({"data": {"bogus": 1}})
    with pytest.raises(OrganismConfigError, match="train.lr"):
        OrganismConfig.from_dict({"train": {"lr": -1.0}})


# ---------------------------------------------------------------------------- training
def _tiny(tmp_path=None, **train) -> OrganismConfig:
    return OrganismConfig.from_dict(
        {
            "kind": "reasoning",
            "seed": 5,
            "model": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 8,
                "intermediate_size": 64,
                "max_position_embeddings": 128,
            },
            "data": {"train_problems": 64, "seq_len": 80, "use_text": False},
            "train": {"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 3, **train},
            "checkpoint_dir": None if tmp_path is None else str(tmp_path),
        }
    )


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_training_loss_decreases():
    from capjax.model import init_params
    from capjax.pruning.importance import PRUNABLE, get_path

    r = train(_tiny(steps=40), progress=False, log=lambda *_: None)
    loss = r["history"]["loss"]
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:3]), loss
    start = init_params(r["model"].config, 5)
    for p in PRUNABLE:  # every projection trained (the dense masks keep them all)
        w = np.asarray(get_path(r["params"], p))
        assert np.all(np.any(w != np.asarray(get_path(start, p)), axis=tuple(range(1, w.ndim)))), p
        assert np.count_nonzero(w) == w.size, p  # and none held at zero


@pytest.mark.slow  # ~20 s of training each: in `make test-slow`, which CI runs too
def test_training_is_deterministic_from_the_seed():
    a = train(_tiny(), progress=False, log=lambda *_: None)
    b = train(_tiny(), progress=False, log=lambda *_: None)
    for x, y in zip(_leaves(a["params"]), _leaves(b["params"])):
        np.testing.assert_array_equal(x, y)
    assert a["history"]["loss"] == b["history"]["loss"]
    c = train(OrganismConfig.from_dict({**_tiny().to_dict(), "seed": 6}), progress=False, log=lambda *_: None)
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(a["params"]), _leaves(c["params"])))


class _Stop(Exception):
    pass


@pytest.mark.slow  # ~20 s of training each: in `make test-slow`, which CI runs too
def test_resume_from_orbax_checkpoint_equals_an_uninterrupted_run(tmp_path):
    whole = train(_tiny(), progress=False, log=lambda *_: None)

    def stop_after_4(step, _):
        if step == 4:  # the checkpoint of step 3 is on disk, step 4's is not
            raise _Stop

    with pytest.raises(_Stop):
        train(_tiny(tmp_path), progress=False, log=lambda *_: None, callback=stop_after_4)
    resumed = train(_tiny(tmp_path), progress=False, log=lambda *_: None)
    assert resumed["history"]["resumed_from"] == 3
    for x, y in zip(_leaves(whole["params"]), _leaves(resumed["params"])):
        np.testing.assert_array_equal(x, y)
    assert resumed["history"]["loss"] == whole["history"]["loss"]


# ---------------------------------------------------------------------------- attention and circuits
def test_attention_probs_equal_transformers_output_attentions(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from capjax.io import save_pretrained
    from capjax.model import Decoder, init_params
    from capjax.organism.train import model_config

    cfg = OrganismConfig.from_dict(
        {
            "kind": "induction",
            "model": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 8,
                "intermediate_size": 48,
            },
        }
    )
    config = model_config(cfg, 40)
    model = Decoder(config)
    params = jax.tree.map(lambda a: a * 4.0, init_params(config, 1))  # sharper attention than at init
    save_pretrained(model, params, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(0).integers(0, 40, (3, 11)).astype(np.int32)
    probs = ind.attention_probs(model, params, tokens)  # [L, N, H, T, S]
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long), output_attentions=True).attentions
    ref = np.stack([a.numpy() for a in ref])
    assert probs.shape == ref.shape
    np.testing.assert_allclose(probs, ref, atol=2e-5)
    assert probs[0, 0, 0].std() > 1e-3  # not uniform: the comparison can tell heads apart


def test_attention_scores_and_precision_by_hand():
    L, N, H, P = 2, 3, 4, 5
    T = 1 + 2 * P
    probs = np.zeros((L, N, H, T, T), np.float32)
    for t in range(T):
        probs[:, :, :, t, 0] = 1.0  # every head rests on <s> ...
    t = np.arange(1, T)
    probs[0, :, 2, t, 0], probs[0, :, 2, t, t - 1] = 0.0, 1.0  # ... but head (0, 2) looks one back
    q = np.arange(1 + P, 1 + 2 * P)
    probs[1, :, 1, q, 0], probs[1, :, 1, q, q - P + 1] = 0.2, 0.8  # and (1, 1) at the token after the match
    prev, prefix = ind.previous_token_scores(probs), ind.prefix_matching_scores(probs, P)
    assert prev[0, 2] == 1.0 and prefix[1, 1] == pytest.approx(0.8) and prefix.sum() == pytest.approx(0.8)
    c = ind.circuit(prefix, prev, threshold=0.3)
    assert c["induction"] == [(1, 1)] and c["previous"] == [(0, 2)]
    scores = np.array([[0.0, 0.5, 0.9, 0.1], [0.2, 0.8, 0.0, 0.3]])
    assert ind.precision_at_k(scores, c["all"]) == 1.0
    assert ind.precision_at_k(scores, c["all"], k=3) == pytest.approx(2 / 3)


def test_induction_examples_repeat_their_segment():
    b = ind.induction_examples(20, 8, 30, seed=0)
    for toks, loss, am in zip(b["tokens"], b["loss_mask"], b["attention_mask"]):
        n = int(am.sum())
        k = int(loss.sum()) + 1  # segment length
        assert np.array_equal(toks[n - k : n], toks[n - 2 * k : n - k]) and loss[n - k] == 0 and loss[n - 1] == 1


# ---------------------------------------------------------------------------- the shipped organisms
@pytest.mark.slow
def test_shipped_reasoning_organism_solves_500_heldout_problems():
    from capjax.io import load_pretrained, load_tokenizer
    from capjax.organism.train import reasoning_accuracy

    folder = WEIGHTS / "reasoning"
    model, params = load_pretrained(folder)
    acc = reasoning_accuracy(model, params, load_tokenizer(folder), n=500)
    assert acc["n"] == 500 and acc["accuracy"] >= 0.95, acc
    assert set(acc["by_steps"]) == {"2", "3", "4"}


@pytest.mark.slow
def test_shipped_induction_organism_cap_finds_the_planted_circuit_and_misses_redundancy():
    import capjax
    from capjax.io import load_pretrained

    model, params = load_pretrained(WEIGHTS / "induction")
    probe = ind.repeat_batch(64, 16, 128, seed=1)
    probs = ind.attention_probs(model, params, probe["tokens"])
    c = ind.circuit(ind.prefix_matching_scores(probs, 16), ind.previous_token_scores(probs))
    assert len(c["induction"]) >= 2 and c["previous"], c
    calib = ind.repeat_batch(64, 16, 128, seed=3)
    for method in ("ablation", "gradient"):
        s = capjax.score_heads(model, params, calib["tokens"], calib["loss_mask"], method=method, progress=False)
        # every circuit head ranks above every other head (chance: |circuit| / heads)
        assert ind.precision_at_k(np.asarray(s.delta), c["all"]) == 1.0, method
    # redundancy: the induction heads together cost far more than the sum of their single ablations
    red = ind.redundancy(model, params, calib, c["induction"])
    assert red["group"] > 5 * red["sum_single"] and red["group"] > 1.0, red


def _hook_head_patch(hf, target, source, layer, head, head_dim):
    """One transformers run of `target` whose o_proj input (the heads' concatenated z) at `layer`
    has head `head`'s slice taken from a run of `source` (a forward pre-hook): logits [B, T, V]."""
    import torch

    o_proj = hf.model.layers[layer].self_attn.o_proj
    got = {}
    sl = slice(head * head_dim, (head + 1) * head_dim)
    h = o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0].clone()))
    with torch.no_grad():
        hf(torch.as_tensor(source, dtype=torch.long))
    h.remove()

    def swap(m, a):
        z = a[0].clone()
        z[..., sl] = got["z"][..., sl]
        return (z,)

    h = o_proj.register_forward_pre_hook(swap)
    with torch.no_grad():
        logits = hf(torch.as_tensor(target, dtype=torch.long)).logits.numpy()
    h.remove()
    return logits


def _np_repeat_loss(logits, batch):
    """The repeat's mean next-token loss of batch's tokens at its loss_mask, in numpy."""
    x = logits[:, :-1].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    w = batch["loss_mask"][:, 1:]
    return float((nll * w).sum() / w.sum())


def test_induction_patching_scores_equal_a_transformers_hook_loop():
    torch = pytest.importorskip("torch")
    import transformers

    from capjax.io import load_pretrained

    folder = WEIGHTS / "induction"
    model, params = load_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    c = model.config
    batch = ind.repeat_batch(8, 16, 128, seed=3)
    corrupted = ind.corrupt_first_copy(batch, 16, 128)
    assert (corrupted["tokens"][:, 17:] == batch["tokens"][:, 17:]).all()  # the second copy is kept
    assert (corrupted["tokens"][:, 1:17] != batch["tokens"][:, 1:17]).mean() > 0.9  # the first resampled
    got = ind.patching_scores(model, params, batch, 16, 128)
    with torch.no_grad():
        clean = _np_repeat_loss(hf(torch.as_tensor(batch["tokens"], dtype=torch.long)).logits.numpy(), batch)
        bad = _np_repeat_loss(hf(torch.as_tensor(corrupted["tokens"], dtype=torch.long)).logits.numpy(), batch)
    np.testing.assert_allclose([got["clean_loss"], got["corrupted_loss"]], [clean, bad], rtol=1e-4)
    assert bad > clean + 1.0  # the corruption breaks the repeat
    noising = np.zeros((c.num_layers, c.num_heads))
    denoising = np.zeros((c.num_layers, c.num_heads))
    for layer in range(c.num_layers):
        for head in range(c.num_heads):
            noising[layer, head] = (
                _np_repeat_loss(
                    _hook_head_patch(hf, batch["tokens"], corrupted["tokens"], layer, head, c.head_dim), batch
                )
                - clean
            )
            denoising[layer, head] = bad - _np_repeat_loss(
                _hook_head_patch(hf, corrupted["tokens"], batch["tokens"], layer, head, c.head_dim), batch
            )
    np.testing.assert_allclose(got["noising"], noising, atol=2e-4)
    np.testing.assert_allclose(got["denoising"], denoising, atol=2e-4)
    assert np.abs(noising).max() > 0.5 and np.abs(denoising).max() > 0.5  # the patches move the loss


@pytest.mark.slow
def test_shipped_induction_organisms_activation_patching_precision():
    """Noising (a clean run with one head from the corrupted run) finds the 2 x 4 circuit but, like
    single-head ablation, misses redundant induction heads on the 2 x 8 organism; denoising (the
    corrupted run with one head's clean output) ranks every induction head first on both."""
    from capjax.io import load_pretrained

    for name, H in (("induction", 4), ("induction_h8", 8)):
        model, params = load_pretrained(WEIGHTS / name)
        probs = ind.attention_probs(model, params, ind.repeat_batch(64, 16, 128, seed=1)["tokens"])
        c = ind.circuit(ind.prefix_matching_scores(probs, 16), ind.previous_token_scores(probs))
        r = ind.patching_scores(model, params, ind.repeat_batch(64, 16, 128, seed=3), 16, 128)
        assert r["corrupted_loss"] > r["clean_loss"] + 1.0, (name, r)
        assert ind.precision_at_k(r["denoising"], c["induction"]) == 1.0, (name, c, r)
        if H == 4:
            assert ind.precision_at_k(r["noising"], c["all"]) == 1.0, (name, c, r)
        else:  # 8 redundant induction heads: patching one at a time barely moves the loss
            assert len(c["induction"]) == 8, c
            assert ind.precision_at_k(r["noising"], c["induction"]) < len(c["induction"]) / (2 * H), (name, c, r)


def test_organism_run_config_validates_and_finds_the_shipped_weights(tmp_path):
    from capjax.experiment.config import load_run_config, validate_run_config
    from capjax.io import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_run_config(root / "configs" / "organism.yaml", [f"out={tmp_path}"])
    assert cfg.calibration.tasks == ("organism",) and cfg.evaluation.tasks == ("organism",)
    validate_run_config(cfg)  # the organism task needs no data folder
    config = load_config(root / cfg.model)
    assert (config.model_type, config.num_heads, config.num_kv_heads) == ("llama", 4, 2)  # GQA Llama layout


def test_compare_weights_finds_a_one_ulp_change_and_names_a_missing_file(tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from capjax.organism.train import compare_weights

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(WEIGHTS / "induction", a)
    shutil.copytree(WEIGHTS / "induction", b)
    same = compare_weights(a, b)
    assert same["identical"] and same["tensors"] == len(load_file(str(a / "model.safetensors")))
    tensors = load_file(str(b / "model.safetensors"))
    name = sorted(tensors)[3]
    w = tensors[name].copy()
    w.flat[7] = np.nextafter(w.flat[7], np.inf, dtype=w.dtype)  # one ulp
    tensors[name] = w
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    diff = compare_weights(a, b)
    assert not diff["identical"] and list(diff["differing"]) == [name], diff
    assert 0 < diff["differing"][name] < 1e-6
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "c" / "model.safetensors")):
        compare_weights(a, tmp_path / "c")


def test_study_maps_sparsity_to_structured_shapes_by_parameter_count():
    """scripts/organism_study.py's cap_structured shapes on the reasoning organism (4 layers, 4
    heads in 2 kv groups, MLP 256): the fraction of decoder-layer parameters each removes, counted by
    hand, is within 1 point of the sparsity, or the sparsity is refused."""
    import importlib.util

    from capjax.io import load_config
    from capjax.structured.method import shape_for

    path = Path(__file__).resolve().parents[1] / "scripts" / "organism_study.py"
    spec = importlib.util.spec_from_file_location("organism_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    config = load_config(WEIGHTS / "reasoning")
    E, D = config.hidden_size, config.head_dim

    def by_hand(shape):  # q, k, v, o, gate / up / down, two norms, per kept layer
        per = E * D * (2 * shape.num_heads + 2 * shape.num_kv_heads) + 3 * E * shape.intermediate_size + 2 * E
        return shape.num_layers * per

    full = config.num_layers * (E * D * (2 * 4 + 2 * 2) + 3 * E * 256 + 2 * E)
    for s, layers in ((0.3, 0), (0.5, 0), (0.6, 0), (0.7, 1)):
        options, _ = study.structured_options(config, s)
        assert options == {"layers": layers}, (s, options)
        removed = 1 - by_hand(shape_for(config, s, options)) / full
        assert s <= removed <= s + study.STRUCTURED_TOLERANCE, (s, removed)
    for s in (0.1, 0.2):  # the smallest cut halves each kv group's heads: 27.7% at least
        options, note = study.structured_options(config, s)
        assert options is None and "27.7%" in note, note


def test_study_merge_joins_parts_and_recomputes_the_paired_tests(tmp_path):
    """scripts/organism_study.py --merge: cells from disjoint parts, an interrupted part's incomplete
    label dropped, the paired difference with Wanda equal to capjax.stats on the same answers, and
    one-line refusals of mismatched parts."""
    import importlib.util
    import json

    from capjax import stats

    path = Path(__file__).resolve().parents[1] / "scripts" / "organism_study.py"
    spec = importlib.util.spec_from_file_location("organism_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rng = np.random.default_rng(0)

    def cell(p):
        correct = (rng.random(40) < p).astype(int).tolist()
        iv = stats.binomial_interval(sum(correct), 40)
        return {"accuracy": sum(correct) / 40, "low": iv.low, "high": iv.high, "n": 40, "correct": correct, "ppl": 20.0}

    sp = [0.1, 0.5]
    dense = cell(0.99)
    parts = {
        "a": {"dense": dense, "wanda": {str(s): cell(0.8) for s in sp}, "cap": {"0.1": cell(0.9)}},
        "b": {"cap": {str(s): cell(0.9) for s in sp}},
    }
    for name, results in parts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "reasoning.json").write_text(
            json.dumps(
                {
                    "sparsities": sp,
                    "n": 40,
                    "calibration": {"n": 64, "seq_len": 80},
                    "head_scores": {},
                    "results": results,
                }
            )
        )
    out = tmp_path / "out"
    out.mkdir()
    res = study.merge(out, [tmp_path / "a", tmp_path / "b"])
    assert set(res["results"]) == {"dense", "wanda", "cap"}
    for s in map(str, sp):
        got = res["results"]["cap"][s]
        assert got["correct"] == parts["b"]["cap"][s]["correct"]  # the complete part's cells, not a's partial one
        a, b = parts["a"]["wanda"][s]["correct"], got["correct"]
        want = stats.paired_difference({"num": a, "den": [1] * 40}, {"num": b, "den": [1] * 40})
        assert got["vs_wanda"]["diff"] == pytest.approx(np.mean(b) - np.mean(a))
        assert (got["vs_wanda"]["low"], got["vs_wanda"]["high"]) == (want.low, want.high)
    assert (out / "reasoning.md").is_file() and (out / "accuracy_ppl_vs_sparsity.png").is_file()
    # the same label complete in two parts, or other dense answers: refused, naming the file
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "reasoning.json").write_text((tmp_path / "b" / "reasoning.json").read_text())
    with pytest.raises(SystemExit, match="c/reasoning.json: cap was measured by .*b too"):
        study.merge(out, [tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    other = json.loads((tmp_path / "a" / "reasoning.json").read_text())
    other["results"] = {"dense": cell(0.5)}
    (tmp_path / "c" / "reasoning.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="c/reasoning.json: the dense model's answers differ"):
        study.merge(out, [tmp_path / "a", tmp_path / "b", tmp_path / "c"])


def _study():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "organism_study.py"
    spec = importlib.util.spec_from_file_location("organism_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_study_matches_cap_heads_to_sparsity_by_a_hand_count_of_removed_weights():
    """scripts/organism_study.py's cap_heads cells: the fraction of the prunable weights removed with
    the k lowest-scoring heads removed equals a hand count (q and o per head, k and v per kv group
    whose every head is gone), and the chosen head count is the fewest reaching the sparsity within
    1 point, or the sparsity is refused with the nearest counts."""
    from capjax.io import load_pretrained

    study = _study()
    model, params = load_pretrained(WEIGHTS / "reasoning")
    c = model.config
    L, H, K, E, D, F = c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_size, c.head_dim, c.intermediate_size
    delta = np.random.default_rng(3).permutation(L * H).reshape(L, H).astype(np.float32)  # no ties
    got = study.removed_by_head_count(model, params, delta)
    total = L * (E * D * (2 * H + 2 * K) + 3 * E * F)
    order = np.argsort(delta.reshape(-1))
    want = []
    for k in range(L * H):
        gone = np.zeros(L * H, bool)
        gone[order[:k]] = True
        gone = gone.reshape(L, K, H // K)
        want.append((2 * E * D * gone.sum() + 2 * E * D * gone.all(-1).sum()) / total)
    np.testing.assert_allclose(got["removed"], want, rtol=0, atol=1e-12)
    for s in (0.05, 0.1, 0.2, 0.3):
        amount, note = study.head_options(got, s)
        first = next((k for k in range(1, L * H) if want[k] >= s), None)
        if first is not None and want[first] - s <= study.STRUCTURED_TOLERANCE:
            assert amount == first / (L * H), (s, note)
        else:
            assert amount is None, (s, note)
    amount, note = study.head_options(got, 0.5)  # more than the attention holds
    assert amount is None and f"only {want[-1]:.1%}" in note, note


@pytest.mark.slow
def test_study_recovery_keeps_removed_weights_zero_and_lowers_its_loss():
    """scripts/organism_study.py's "+ce" / "+distil" cells: after recover_structured, every weight
    cap_structured removed is exactly zero, and the objective recomputed with a plain forward pass
    (the NLL of the loss tokens; the KL from the dense model's next-token distribution) is lower
    than before recovery."""
    import capjax
    from capjax.io import load_pretrained, load_tokenizer

    study = _study()
    study.RECOVERY.update(steps=6, batch_size=8, n=32)
    model, params = load_pretrained(WEIGHTS / "reasoning")
    tok = load_tokenizer(WEIGHTS / "reasoning")
    data = study._recovery_data(tok, None, 32, study.CALIB_SEQ, seed=2)  # problems only, no data folder needed
    delta = np.arange(16, dtype=np.float32).reshape(4, 4)
    options, _ = study.structured_options(model.config, 0.3)
    pruned, masks = capjax.prune(model, params, "cap_structured", 0.3, head_scores=delta, calib=data, **options)

    def log_probs(p):  # [B, T - 1, V] next-token log-probabilities
        logits = model.apply({"params": p}, data["tokens"], attention_mask=data["attention_mask"])
        return np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1))

    target, w = data["tokens"][:, 1:], data["loss_mask"][:, 1:]
    dense_lp = log_probs(params)

    def objective(p, loss):
        lp = log_probs(p)
        if loss == "ce":
            per = -np.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
        else:
            per = np.sum(np.exp(dense_lp) * (dense_lp - lp), axis=-1)
        return float(np.sum(per * w) / np.sum(w))

    for loss in ("ce", "distil"):
        out, history = study.recover_structured(model, params, pruned, masks, data, loss)
        assert history["steps"] == 6
        for path in ("layers/self_attn/q_proj/kernel", "layers/mlp/up_proj/kernel"):
            kept = np.asarray(capjax.pruning.importance.get_path(masks, path))
            w_out = np.asarray(capjax.pruning.importance.get_path(out, path))
            assert (~kept).any() and np.all(w_out[~kept] == 0), path
        assert objective(out, loss) < objective(pruned, loss), loss


@pytest.mark.slow
def test_study_reasoning_part_runs_the_structured_methods_at_a_tiny_n(tmp_path):
    """scripts/organism_study.py's reasoning part with cap_heads, cap_structured and
    cap_structured+ce at 30% (n = 8, 3 recovery steps): the cap_heads cell's answers and answer loss
    equal those of the model with the chosen heads' q columns and o rows zeroed by hand (and k / v of emptied kv
    groups), the recovered cell keeps cap_structured's removed fraction, and the table states the
    recovery."""
    import json

    from capjax.io import load_pretrained, load_tokenizer
    from capjax.organism.train import reasoning_accuracy

    study = _study()
    study.RECOVERY.update(steps=3, n=16)
    folder = WEIGHTS / "reasoning"
    methods = ["cap_heads", "cap_structured", "cap_structured+ce"]
    res = study.reasoning_part(tmp_path, folder, [0.3], 8, methods, print)
    cells = {k: res["results"][k]["0.3"] for k in methods}
    heads = cells["cap_heads"]["options"]["heads"]
    model, params = load_pretrained(folder)
    tok = load_tokenizer(folder)
    c = model.config
    delta = np.asarray(res["head_scores"]["cap"]).reshape(-1)
    gone = np.zeros(c.num_layers * c.num_heads, bool)
    gone[np.argsort(delta, kind="stable")[:heads]] = True
    gone = gone.reshape(c.num_layers, c.num_heads)
    by_hand = jax.tree.map(np.array, params)
    a = by_hand["layers"]["self_attn"]
    for layer, head in zip(*np.nonzero(gone)):
        a["q_proj"]["kernel"][layer, :, head, :] = 0
        a["o_proj"]["kernel"][layer, head, :, :] = 0
    G = c.num_heads // c.num_kv_heads
    for layer, kv in zip(*np.nonzero(gone.reshape(c.num_layers, c.num_kv_heads, G).all(-1))):
        a["k_proj"]["kernel"][layer, :, kv, :] = 0
        a["v_proj"]["kernel"][layer, :, kv, :] = 0
    want = reasoning_accuracy(model, by_hand, tok, n=8)
    assert cells["cap_heads"]["correct"] == want["correct"]
    assert cells["cap_heads"]["answer_loss"] == pytest.approx(want["answer_loss"], rel=1e-5)
    assert 0.3 <= cells["cap_heads"]["removed"] <= 0.3 + study.STRUCTURED_TOLERANCE
    plain, recovered = cells["cap_structured"], cells["cap_structured+ce"]
    assert recovered["removed"] == plain["removed"] and recovered["recovery"]["steps"] == 3
    table = (tmp_path / "reasoning.md").read_text()
    assert "3 steps of 16 packed rows" in table and "cap_structured+ce at 30%: loss" in table
    assert json.loads((tmp_path / "reasoning.json").read_text())["recovery"]["steps"] == 3
