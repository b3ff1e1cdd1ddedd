"""A structured export (heads, MLP channels and a layer removed, smaller config) in lm-evaluation-harness'
`--model hf` (HFLM, transformers): its log-likelihoods equal transformers' own on the folder and the
masked dense capjax model's, and `simple_evaluate(model="hf")` on a local task gives the same accuracy
as the capjax adapter on the same folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import capjax  # noqa: E402
from capjax.integrations.lm_eval import CapjaxLM  # noqa: E402
from capjax.structured import choose, masked_logits, shrink, target_shape  # noqa: E402
from conftest import char_tokenizer, make_hf_model  # noqa: E402
from test_lm_eval import task_dir  # noqa: E402

LL = [("Q: 2+2\nA:", " 4"), ("abc ", "def"), ("The cat", " sat on the mat."), ("x" * 20, "yz")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(dense capjax model, params, plan, tokenizer, folder of the shrunken export)."""
    src = tmp_path_factory.mktemp("dense")
    make_hf_model(src, "llama", seed=5, max_position_embeddings=128, eos_token_id=1, pad_token_id=0)
    tok = char_tokenizer()
    tok.save_pretrained(src)
    model, params = capjax.load_pretrained(src)
    c = model.config
    rng = np.random.default_rng(3)
    plan = choose(
        c,
        target_shape(c, heads=0.5, mlp=0.25, layers=1),
        rng.normal(size=(c.num_layers, c.num_heads)),
        rng.normal(size=(c.num_layers, c.intermediate_size)),
        rng.normal(size=c.num_layers),
    )
    small, sp = shrink(model, params, plan)
    out = capjax.save_pretrained(small, sp, tmp_path_factory.mktemp("structured"), tok)
    return model, params, plan, tok, out


def _direct(logits, ctx, cont):
    """(sum log p(cont | ctx), greedy) from logits [T, V] of ctx + cont."""
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    pos = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return lp[pos, cont].sum(), bool(np.all(lp[pos].argmax(-1) == cont))


def test_hflm_loglikelihoods_equal_transformers_and_the_masked_model(exported):
    model, params, plan, tok, out = exported
    cfg = json.loads((out / "config.json").read_text())
    c2 = plan.config(model.config)
    assert (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
    ) == (c2.num_heads, c2.num_kv_heads, c2.intermediate_size, c2.num_layers)
    assert c2.num_params() < model.config.num_params()
    hflm = HFLM(pretrained=str(out), dtype="float32", batch_size=2, device="cpu")
    got = hflm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(LL)]
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for (ll, greedy), (context, continuation) in zip(got, LL):
        n = len(context) - len(context.rstrip())  # lm-eval moves the context's trailing spaces to the continuation
        context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        ids = np.asarray([ctx + cont])
        with torch.no_grad():
            want = _direct(hf(torch.as_tensor(ids)).logits[0].numpy(), ctx, cont)
        masked = _direct(np.asarray(masked_logits(model, params, plan, ids))[0], ctx, cont)
        np.testing.assert_allclose(ll, want[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(ll, masked[0], rtol=1e-5, atol=1e-4)
        assert greedy == want[1]


def test_simple_evaluate_model_hf_on_the_export(exported, tmp_path):
    _, _, _, _, out = exported
    rng = np.random.default_rng(0)
    rows = [
        {"q": f"{a}+{b}", "choices": [str(a + b + d) for d in (0, 1, -1, 10)], "gold": int(rng.integers(4))}
        for a, b in rng.integers(0, 50, (12, 2))
    ]
    (tmp_path / "tiny_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tm = TaskManager(include_path=str(task_dir(tmp_path, tmp_path, ["tiny_choice.yaml"])))
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},dtype=float32",
        tasks=["tiny_choice"],
        task_manager=tm,
        batch_size=4,
        device="cpu",
    )
    ours = lm_eval.simple_evaluate(model=CapjaxLM(pretrained=str(out)), tasks=["tiny_choice"], task_manager=tm)
    assert hf["results"]["tiny_choice"]["acc,none"] is not None
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(ours["results"]["tiny_choice"][metric] - hf["results"]["tiny_choice"][metric]) <= 1e-6
