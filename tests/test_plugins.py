"""One registry shape, plugins from installed packages' entry points, and tasks as objects: a package
installed into a temporary folder (a dist-info with a `capjax.plugins` entry point, nothing in
CAPJAX_PLUGINS) registers a pruning method that changes weights, an ablation kind and an evaluation
task, and all three run through `capjax run` (the task through `capjax eval` too)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml

from capjax.cli import main
from capjax.registry import Registry, UnknownNameError
from conftest import needs_smollm2

PLUGIN = '''
import jax.numpy as jnp
import numpy as np

from capjax.ablation import register_kind
from capjax.data import Task, register_task
from capjax.pruning.registry import register_method


def scale_and_mask(job):
    """Prunes the first int(n * sparsity) weights of each layer slice (flattened order) and scales
    every weight by `factor`: new weights, so it declares produces="masks+weights"."""
    new, masks = {}, {}
    for p, w in job.kernels.items():
        n = int(np.prod(w.shape[1:]))
        masks[p] = jnp.broadcast_to((jnp.arange(n) >= int(n * job.sparsity)).reshape(w.shape[1:]), w.shape)
        new[p] = w * job.options["factor"]
    return new, masks


def tenth(model, params, batch, seed):
    """Every ablated head's output replaced by 0.1 (blocks by 0)."""
    c = model.config
    zeros = jnp.zeros((c.num_layers, c.hidden_size), model.dtype)
    return {"heads": jnp.full((c.num_layers, c.num_heads, c.head_dim), 0.1, model.dtype), "attn": zeros,
            "mlp": zeros}


def echo_records(n, seed, split):
    rng = np.random.default_rng([seed, {"calib": 0, "eval": 1}[split]])
    return [{"id": f"echo/{split}/{i}", "question": f"Say {a}.", "reasoning": "", "answer": str(a)}
            for i, a in enumerate(rng.integers(10, 100, size=n))]


def said(text, record):
    return {"said": float(record["answer"] in text)}


register_method("scale_and_mask", scale_and_mask, options={"factor": 0.5}, needs_scores=True,
                produces="masks+weights")
register_kind("tenth", tenth)
register_task(Task("echo", generate=echo_records, calib_split="calib", eval_split="eval", eval_size=4,
                   instruction="Repeat the number.", score=said, answer_loss=True))
'''


def install_plugin(site, monkeypatch, text=PLUGIN, name="capjax_toy_plugin"):
    """A package `name` installed into `site` as pip would (module + dist-info with its entry point)."""
    (site / f"{name}.py").write_text(text)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[capjax.plugins]\ntoy = {name}\n")
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    from capjax.ablation import unregister_kind
    from capjax.data import unregister_task
    from capjax.pruning import registry

    monkeypatch.delenv("CAPJAX_PLUGINS", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, monkeypatch)
    yield
    registry.unregister_method("scale_and_mask")
    unregister_kind("tenth")
    unregister_task("echo")
    sys.modules.pop("capjax_toy_plugin", None)


def test_registry_shape():
    r = Registry("widget", hint="register one with register_widget")
    r.register("a", 1, builtin=True)
    r.register("b", 2)
    assert r.names() == ("a", "b") and r["b"] == 2 and "a" in r and list(r) == ["a", "b"] and len(r) == 2
    with pytest.raises(ValueError, match="^widget 'b' is already registered; pass replace=True"):
        r.register("b", 3)
    assert r.register("b", 3, replace=True) == 3 and r.lookup("b") == 3
    with pytest.raises(UnknownNameError) as e:
        r.lookup("c")
    assert str(e.value) == "unknown widget 'c'; known: a, b (register one with register_widget)"
    r.unregister("a")  # a built-in stays
    r.unregister("b")
    assert r.names() == ("a",)
    fixed = Registry("kind", replace_builtins=False)
    fixed.register("zero", None, builtin=True)
    with pytest.raises(ValueError, match="'zero' is a built-in kind; pick another name"):
        fixed.register("zero", 1, replace=True)


def test_registry_items_load_plugins_once():
    """items() (what the CLI's choice lists read) loads plugins once, not once per entry."""
    reads = []
    r = Registry("widget", on_read=lambda: reads.append(1))
    for name, value in (("a", 1), ("b", 2), ("c", 3)):
        r.register(name, value)
    assert list(r.items()) == [("a", 1), ("b", 2), ("c", 3)] and len(reads) == 1


def test_every_extension_point_reads_one_registry_and_lists_names_in_one_line():
    from capjax import estimators
    from capjax.ablation import kinds, metrics
    from capjax.data import task
    from capjax.families import FAMILIES, family_for
    from capjax.pruning import registry

    for reg in (registry.METHODS, estimators._ESTIMATORS, metrics.METRICS, kinds._REGISTERED, FAMILIES, task.TASKS):
        assert isinstance(reg, Registry)
        with pytest.raises(ValueError) as e:
            reg.lookup("no_such_name")
        assert "\n" not in str(e.value) and ", ".join(reg.names()) in str(e.value), str(e.value)
    assert family_for("qwen3").name == "qwen3"


def test_methods_declare_what_they_produce():
    from capjax.pruning import registry

    assert [n for n in registry.names() if registry.spec(n).changes_weights] == ["sparsegpt"]
    with pytest.raises(ValueError, match=r"^method 'x': produces must be one of masks, masks\+weights, got 'weights'"):
        registry.register_method("x", "capjax.pruning.methods:magnitude", produces="weights")
    assert "x" not in registry.names()


def test_broken_entry_point_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CAPJAX_PLUGINS", raising=False)
    monkeypatch.delenv("CAPJAX_DEBUG", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, monkeypatch, text="x = 1 / 0\n", name="capjax_broken_plugin")
    try:
        assert main(["prune", "--help"]) == 2
    finally:
        sys.modules.pop("capjax_broken_plugin", None)
    err = capsys.readouterr().err
    assert err.strip() == (
        "capjax: error: entry point toy = 'capjax_broken_plugin' (group capjax.plugins, package "
        "capjax_broken_plugin): ZeroDivisionError: division by zero; fix or uninstall that package"
    )


def torch_answer_loss(folder, prompts, answers):
    """Mean NLL per answer token of answers given prompts (plain mode: the prompt with the tokenizer's
    special tokens, the answer without), by transformers' PyTorch model."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for p, a in zip(prompts, answers):
        pi, ai = tok(p)["input_ids"], tok(a, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pi + ai])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
        total -= float(logp[torch.arange(len(pi) - 1, len(pi) + len(ai) - 1), ids[0, len(pi) :]].sum())
        count += len(ai)
    return total / count


@needs_smollm2
def test_plugin_task_through_capjax_eval(plugin, tmp_path, tiny_with_tokenizer):
    from capjax.experiment.config import eval_task_names

    assert "echo" in eval_task_names()  # from the entry point alone
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_with_tokenizer),
                "--tasks",
                "echo",
                "--limit",
                "3",
                "--no-chat",
                "--max-new-tokens",
                "3",
                "--bootstrap",
                "0",
                "--log-samples",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    metrics, samples = res["results"]["echo"], res["samples"]["echo"]
    numbers = [int(a) for a in np.random.default_rng([0, 1]).integers(10, 100, size=3)]  # echo_records by hand
    assert [s["target"] for s in samples] == [str(a) for a in numbers] and metrics["n"] == 3
    assert metrics["said"] == pytest.approx(np.mean([str(a) in s["output"] for a, s in zip(numbers, samples)]))
    want = torch_answer_loss(
        tiny_with_tokenizer,
        [f"Question: Say {a}.\nAnswer:" for a in numbers],
        [f" The answer is {a}." for a in numbers],
    )
    assert metrics["answer_loss"] == pytest.approx(want, rel=1e-4)


@needs_smollm2
def test_plugin_method_kind_and_task_through_capjax_run_and_weights_survive_reuse(
    plugin, tmp_path, tiny_with_tokenizer
):
    import capjax
    from capjax.data import build_calibration
    from capjax.experiment import Experiment, load_run_config, plan_runs
    from capjax.pruning import PRUNABLE
    from capjax.pruning.importance import get_path

    cfg = {
        "model": str(tiny_with_tokenizer),
        "out": str(tmp_path / "out"),
        "seed": 0,
        "calibration": {
            "tasks": ["echo"],
            "n": 4,
            "seq_len": 64,
            "subsets": 2,
            "kind": "tenth",
            "chat": False,
            "bootstrap": 0,
        },
        "pruning": {"methods": ["scale_and_mask"], "sparsities": [0.25]},
        "evaluation": {"tasks": ["echo"], "limit": 2, "max_new_tokens": 2, "batch_size": 2, "bootstrap": 0},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["dense", "scale_and_mask_echo_s0.25"]
    assert {"said", "answer_loss"} <= set(results["runs"][1]["eval"]["echo"]["metrics"])
    assert "echo/said" in (tmp_path / "out" / "results.csv").read_text()  # the report shows the task

    # the kind: the saved scores are score_heads' with the plugin's kind (and not zero ablation's)
    model, params = capjax.load_pretrained(tiny_with_tokenizer)
    calib = build_calibration("echo", capjax.load_tokenizer(tiny_with_tokenizer), n=4, seq_len=64, seed=0, chat=False)
    ref = capjax.score_heads(
        model,
        params,
        calib.tokens,
        calib.loss_mask,
        2,
        attention_mask=calib.attention_mask,
        progress=False,
        kind="tenth",
    )
    zero = capjax.score_heads(
        model, params, calib.tokens, calib.loss_mask, 2, attention_mask=calib.attention_mask, progress=False
    )
    saved = np.asarray(results["scores"]["echo"]["delta"])
    np.testing.assert_allclose(saved, ref.delta, atol=1e-5)
    assert np.abs(zero.delta - ref.delta).max() > 1e-3

    # the method's new weights: saved with its masks, and a second run reuses them, not the model's own
    exp = Experiment(load_run_config(path))
    exp.load()
    (run,) = plan_runs(exp.cfg)
    fp, pruned, masks = exp.pruned(run, exp.scores("echo"))
    assert exp.events[-1].startswith("reused masks/scale_and_mask_echo_s0.25"), exp.events
    for p in PRUNABLE:
        w = np.asarray(get_path(params, p))
        n = int(np.prod(w.shape[1:]))
        kept = np.broadcast_to((np.arange(n) >= int(n * 0.25)).reshape(w.shape[1:]), w.shape)
        np.testing.assert_array_equal(np.asarray(get_path(pruned, p)), np.where(kept, w * np.float32(0.5), 0))


@pytest.fixture
def toy_names():
    """A method with a seed option, an estimator, a metric, a kind and a calibration task, registered
    in-process under names no capjax code spells."""
    from capjax import estimators
    from capjax.ablation import kinds, metrics
    from capjax.data import task
    from capjax.pruning import registry

    registry.register_method(
        "toy_m",
        "capjax.pruning.methods:magnitude",
        options={"seed": 0, "scope": "a"},
        choices={"scope": ("a", "b")},
        needs_calib=True,
    )
    estimators.register_estimator("toy_e", lambda values, intact, count, subsets=3: values.mean(1))
    metrics.register_metric(lambda z, y: z[:, 0], name="toy_metric")
    kinds.register_kind("toy_k", lambda model, params, batch, seed: None)
    task.register_task(task.Task("toy_t", generate=echo_records, calib_split="c", eval_split="e", score=said))
    yield
    registry.unregister_method("toy_m")
    estimators.unregister_estimator("toy_e")
    metrics.unregister_metric("toy_metric")
    kinds.unregister_kind("toy_k")
    task.unregister_task("toy_t")


def echo_records(n, seed, split):
    return [{"id": f"{split}/{i}", "question": "q", "reasoning": "", "answer": "a"} for i in range(n)]


def said(text, record):
    return {"said": float(record["answer"] in text)}


def test_a_registered_name_is_in_the_cli_choices_and_config_validation(toy_names, tmp_path):
    """No list of names is written in the CLI or the config schema: each reads its registry."""
    from capjax.cli import build_parser
    from capjax.experiment.config import ConfigError, load_run_config, method_options

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def choices(command, dest):
        (action,) = [a for a in commands[command]._actions if a.dest == dest]
        return action.choices, action.help

    assert "toy_m" in choices("prune", "method")[0] and "toy_m" in choices("prune", "calib")[1]
    assert "toy_m: a | b" in choices("prune", "scope")[1]
    for command in ("score", "prune"):
        assert "toy_t" in choices(command, "calib")[0]
    assert "toy_e" in choices("score", "aggregate")[0]
    assert "toy_metric" in choices("score", "metric")[0] and "toy_k" in choices("score", "kind")[0]
    assert "toy_t" in choices("eval", "tasks")[1] and "toy_t" in choices("recover", "data")[1]

    cfg = load_run_config(
        overrides={
            "model": "smollm2-135m-instruct",
            "out": str(tmp_path),
            "seed": 7,
            "calibration": {"tasks": ["toy_t"], "aggregate": "toy_e", "kind": "toy_k", "metric": "toy_metric"},
            "pruning": {"methods": ["toy_m"]},
            "evaluation": {"tasks": ["toy_t"], "limit": {"toy_t": 2}},
        },
        check_files=False,
    )
    assert cfg.calibration.tasks == ("toy_t",) and cfg.pruning.methods == ("toy_m",)
    assert method_options(cfg, "toy_m")["seed"] == 7  # a method's seed option takes the run's seed
    from capjax.pruning.registry import with_run_seed  # (capjax prune's --seed alike)

    assert with_run_seed("toy_m", {"seed": 3}, 7) == {"seed": 3} and with_run_seed("magnitude", {}, 7) == {}
    assert with_run_seed("random", {}, 7) == {"seed": 7}
    with pytest.raises(ConfigError, match="toy_t"):  # the error lists the registered names
        load_run_config(overrides={"model": "m", "out": str(tmp_path), "evaluation": {"tasks": ["toy_x"]}})
