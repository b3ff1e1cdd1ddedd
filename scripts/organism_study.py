"""The paper's experiment on the organisms (docs/organism.md):

    python scripts/organism_study.py --part all --n 500   # everything, one process, into docs/organism/
    python scripts/organism_study.py --part induction     # planted circuits only
    python scripts/organism_study.py --part reasoning --sparsities 0.1 0.3 0.5 0.7 --n 500

induction: on the induction organism, the planted circuit (induction heads by prefix-matching
score, previous-token heads by previous-token score, both from attention probabilities alone),
precision@k of CAP's exact scores and of the gradient scores (capjax.score_heads on <s> A A rows,
the repeat in the loss) and of activation patching (capjax.patching.patch of every head at all
positions, clean <s> A A vs corrupted <s> A' A, metric the repeat's loss; noising and denoising)
against it, and single / pair / group ablations of the circuit's heads.

reasoning: on the reasoning organism, greedy exact match on n held-out problems (Wilson 95%
intervals) and held-out WikiText-2 perplexity against sparsity, for every method below, each
also compared with Wanda at the same sparsity on the same problems (paired bootstrap of the
accuracy difference, capjax.stats.paired_difference); and the 2 x 2: CAP calibrated on word
problems vs on WikiText-2 text, measured on accuracy and on perplexity. The structured methods
are matched to each sparsity by parameter count (`structured_options`, `head_options`); the
"+ce" / "+distil" rows are cap_structured after a short `capjax.recover` run (RECOVERY).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "capjax" / "organism" / "weights"
CALIB_N, CALIB_SEQ = 64, 80
# the short recovery after cap_structured ("+ce": NLL; "+distil": KL from the dense model at
# temperature 1): full fine-tuning of the kept weights on `n` train-split problems plus `n` chunks
# of the training text (the organism's own training mix), rows of 80 tokens, at the organism's
# training peak lr (configs/organism_train.yaml)
RECOVERY = {"steps": 200, "lr": 3e-3, "warmup_steps": 10, "batch_size": 16, "n": 256}


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------- induction
def induction_part(out: Path, folder: Path, log) -> dict:
    import capjax
    from capjax.io import load_pretrained
    from capjax.organism import induction as ind

    spec = json.loads((folder / "organism.json").read_text())["config"]["data"]
    P, V = spec["segment_len"], spec["vocab_size"]
    model, params = load_pretrained(folder)
    c = model.config
    probe = ind.repeat_batch(64, P, V, seed=1)
    probs = ind.attention_probs(model, params, probe["tokens"])
    prefix, previous = ind.prefix_matching_scores(probs, P), ind.previous_token_scores(probs)
    circ = ind.circuit(prefix, previous)
    calib = ind.repeat_batch(64, P, V, seed=3)
    scores = {
        "cap": capjax.score_heads(model, params, calib["tokens"], calib["loss_mask"], progress=False).delta,
        "gradient": capjax.score_heads(
            model, params, calib["tokens"], calib["loss_mask"], method="gradient", progress=False
        ).delta,
    }
    log(f"{folder.name}: circuit and head scores done {_load()}")
    patching = ind.patching_scores(model, params, calib, P, V)  # clean <s> A A vs corrupted <s> A' A
    log(f"{folder.name}: activation patching done {_load()}")
    scores["patching_noising"] = patching["noising"]
    scores["patching_denoising"] = patching["denoising"]
    N = c.num_layers * c.num_heads
    precision = {}
    for name, s in scores.items():
        s = np.asarray(s)
        precision[name] = {
            f"circuit@{len(circ['all'])}": ind.precision_at_k(s, circ["all"]),
            f"induction@{len(circ['induction'])}": ind.precision_at_k(s, circ["induction"]),
        }
    chance = {
        f"circuit@{len(circ['all'])}": len(circ["all"]) / N,
        f"induction@{len(circ['induction'])}": len(circ["induction"]) / N,
    }
    red = ind.redundancy(model, params, calib, circ["all"])
    groups = ind.group_ablations(
        model,
        params,
        calib,
        {"induction heads": circ["induction"], "previous-token heads": circ["previous"], "circuit": circ["all"]},
    )
    acc = ind.repeat_accuracy(model, params, P, V)
    res = {
        "prefix_matching": prefix.tolist(),
        "previous_token": previous.tolist(),
        "circuit": circ,
        "scores": {k: np.asarray(v).tolist() for k, v in scores.items()},
        "precision": precision,
        "chance_precision": chance,
        "patching_losses": {k: patching[k] for k in ("clean_loss", "corrupted_loss")},
        "redundancy": red,
        "groups": groups,
        "repeat_accuracy": acc,
    }
    (out / f"{folder.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    rows = [
        "| head | prefix-matching | previous-token | role | CAP delta | gradient delta | patching (noising) | "
        "patching (denoising) | single ablation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, head in itertools.product(range(c.num_layers), range(c.num_heads)):
        h = (layer, head)
        role = "induction" if h in circ["induction"] else "previous-token" if h in circ["previous"] else "-"
        single = red["single"].get(str(h))
        rows.append(
            f"| {layer}.{head} | {prefix[h]:.3f} | {previous[h]:.3f} | {role} | {scores['cap'][h]:.4f} | "
            f"{scores['gradient'][h]:.4f} | {scores['patching_noising'][h]:.4f} | "
            f"{scores['patching_denoising'][h]:.4f} | {_f(single, 4)} |"
        )
    rows += ["", "| ablated together | loss increase | sum of their single-head increases |", "|---|---|---|"]
    for a, b in itertools.combinations(circ["all"], 2):
        rows.append(
            f"| {a[0]}.{a[1]} + {b[0]}.{b[1]} | {red['pairs'][f'{a}+{b}']:.4f} | "
            f"{red['single'][str(a)] + red['single'][str(b)]:.4f} |"
        )
    for name in ("induction heads", "previous-token heads", "circuit"):
        members = {
            "induction heads": circ["induction"],
            "previous-token heads": circ["previous"],
            "circuit": circ["all"],
        }[name]
        rows.append(
            f"| {name} ({len(members)}) | {groups[name]:.4f} | {sum(red['single'][str(h)] for h in members):.4f} |"
        )
    rows += ["", "| scores | " + " | ".join(chance) + " |", "|---|" + "---|" * len(chance)]
    for name in precision:
        rows.append(f"| {name} | " + " | ".join(f"{precision[name][k]:.3f}" for k in chance) + " |")
    rows.append("| chance (random order) | " + " | ".join(f"{v:.3f}" for v in chance.values()) + " |")
    (out / f"{folder.name}.md").write_text("\n".join(rows) + "\n")
    log(f"{folder.name}: circuit {circ}, precision {precision}, intact loss {red['intact']:.4f} {_load()}")
    return res


# ---------------------------------------------------------------------------- reasoning
def _text_calibration(tokenizer, text: str, n: int, seq_len: int, seed: int) -> dict:
    from capjax.organism.train import text_chunks

    chunks = text_chunks(tokenizer, text, seq_len, seq_len)
    idx = np.sort(np.random.default_rng(seed).permutation(len(chunks["tokens"]))[:n])
    return {k: v[idx] for k, v in chunks.items()}


def reasoning_part(out: Path, folder: Path, sparsities, n: int, methods_wanted, log, dense: bool = True) -> dict:
    import capjax
    from capjax import stats
    from capjax.data import build_calibration
    from capjax.io import load_pretrained, load_tokenizer
    from capjax.organism.text import wikitext_parts
    from capjax.organism.train import heldout_perplexity, reasoning_accuracy
    from capjax.pruning import registry

    cfg = json.loads((folder / "organism.json").read_text())["config"]
    model, params = load_pretrained(folder)
    tok = load_tokenizer(folder)
    parts = wikitext_parts(cfg["data"]["data_dir"], cfg["data"]["heldout_articles"])
    train_text, heldout = parts if parts is not None else (None, None)
    if parts is None:
        log("reasoning: WikiText-2 not found: no perplexity and no text calibration (the 2 x 2 is skipped)")
    calib = {"reasoning": build_calibration("organism", tok, n=CALIB_N, seq_len=CALIB_SEQ, seed=1, chat=False)}
    if train_text is not None:
        calib["text"] = _text_calibration(tok, train_text, CALIB_N, CALIB_SEQ, seed=1)

    def arrays(c):
        return (
            (c["tokens"], c["loss_mask"], c["attention_mask"])
            if isinstance(c, dict)
            else (c.tokens, c.loss_mask, c.attention_mask)
        )

    def heads(c, **kw):
        t, lm, am = arrays(c)
        return capjax.score_heads(model, params, t, lm, attention_mask=am, progress=False, **kw)

    reason_calib = {"tokens": calib["reasoning"].tokens, "attention_mask": calib["reasoning"].attention_mask}
    structured_calib = {**reason_calib, "loss_mask": calib["reasoning"].loss_mask}
    # label -> (registered method, the head scores it ranks by, calibration, recovery); structured:
    # CAP's head scores choose heads, Minitron activations MLP channels (cap_structured's defaults)
    specs = {
        "cap": ("cap", "cap", None, None),
        "cap_paired": ("cap", "cap_paired", None, None),
        "gradient": ("cap", "gradient", None, None),
        "cap_wanda": ("cap_wanda", "cap", reason_calib, None),
        "wanda": ("wanda", None, reason_calib, None),
        "sparsegpt": ("sparsegpt", None, reason_calib, None),
        "magnitude": ("magnitude", None, None, None),
        "random": ("random", None, None, None),
        "cap_text": ("cap", "cap_text", None, None),
        "cap_heads": ("cap_heads", "cap", None, None),
        "cap_structured": ("cap_structured", "cap", structured_calib, None),
        "cap_structured+ce": ("cap_structured", "cap", structured_calib, "ce"),
        "cap_structured+distil": ("cap_structured", "cap", structured_calib, "distil"),
    }
    if "text" not in calib:
        del specs["cap_text"]
    if methods_wanted:
        unknown = sorted(set(methods_wanted) - set(specs))
        if unknown:
            raise SystemExit(f"--methods: unknown label(s) {', '.join(unknown)}; known: {', '.join(specs)}")
    specs = {k: v for k, v in specs.items() if v[0] in registry.names() and (not methods_wanted or k in methods_wanted)}
    score_fns = {
        "cap": lambda: heads(calib["reasoning"]),
        "cap_paired": lambda: heads(calib["reasoning"], aggregate="paired"),
        "gradient": lambda: heads(calib["reasoning"], method="gradient"),
        "cap_text": lambda: heads(calib["text"]),
    }
    scores = {}
    for k in score_fns:
        if any(v[1] == k for v in specs.values()):  # only those needed
            scores[k] = score_fns[k]()
            log(f"head scores {k}: done")
    plan = {k: (m, None if hs is None else scores[hs], cal, rec) for k, (m, hs, cal, rec) in specs.items()}
    wants_heads = any(m == "cap_heads" for m, *_ in plan.values())
    head_fractions = removed_by_head_count(model, params, scores["cap"]) if wants_heads else None
    recovery_data = None
    if any(rec for *_, rec in plan.values()):
        recovery_data = _recovery_data(tok, train_text, RECOVERY["n"], CALIB_SEQ, seed=2)

    def measure(p):
        t0 = time.perf_counter()
        acc = reasoning_accuracy(model, p, tok, n=n)
        ppl = heldout_perplexity(model, p, tok, heldout)
        iv = stats.binomial_interval(sum(acc["correct"]), acc["n"])
        return {
            "accuracy": acc["accuracy"],
            "low": iv.low,
            "high": iv.high,
            "n": acc["n"],
            "by_steps": acc["by_steps"],
            "answer_loss": acc["answer_loss"],
            "correct": acc["correct"],
            "ppl": None if ppl is None else ppl["ppl"],
            "seconds": time.perf_counter() - t0,
        }

    def save():
        res = {
            "sparsities": list(sparsities),
            "n": n,
            "calibration": {"n": CALIB_N, "seq_len": CALIB_SEQ},
            "head_scores": {k: np.asarray(v.delta).tolist() for k, v in scores.items()},
            "results": results,
        }
        if recovery_data is not None:
            res["recovery"] = {**RECOVERY, "rows": len(recovery_data["tokens"]), "seq_len": CALIB_SEQ}
        (out / "reasoning.json").write_text(json.dumps(res, indent=1) + "\n")
        return res

    results = {}
    cells, done = len(plan) * len(sparsities) + int(dense), 0
    if dense:
        results["dense"] = measure(params)
        done += 1
        log(
            f"[{done}/{cells}] dense: accuracy {results['dense']['accuracy']:.3f}, "
            f"ppl {_f(results['dense']['ppl'], 1)} {_load()}"
        )
    pruned_cache: dict = {}  # (method, head scores label, sparsity) -> (pruned, masks, options): +ce / +distil reuse
    for label, (method, hs, cal, rec) in plan.items():
        results[label] = {}
        for s in sparsities:
            done += 1
            options: dict = {}
            amount = s
            if method == "cap_structured":
                options, note = structured_options(model.config, s)
            elif method == "cap_heads":
                amount, note = head_options(head_fractions, s)
                options = None if amount is None else {"heads": round(amount * head_fractions["heads"])}
            if options is None:
                results[label][str(s)] = {"expressible": False, "note": note}
                log(f"[{done}/{cells}] {label} {s:.0%}: not run: {note}")
                continue
            key = (method, specs[label][1], s)
            if key not in pruned_cache:
                prune_options = options if method == "cap_structured" else {}
                pruned_cache[key] = capjax.prune(
                    model, params, method, amount, head_scores=hs, calib=cal, **prune_options
                )
            pruned, masks = pruned_cache[key]
            history = None
            if rec is not None:
                pruned, history = recover_structured(model, params, pruned, masks, recovery_data, rec)
            r = measure(pruned)
            r["removed"] = removed_fraction(masks)
            if options:
                r["options"] = options
            if history is not None:
                r["recovery"] = {
                    "loss": rec,
                    "steps": history["steps"],
                    "first_loss": history["loss"][0],
                    "last_loss": float(np.mean(history["loss"][-10:])),
                    "seconds": history["seconds"],
                }
            results[label][str(s)] = r
            save()  # partial results survive an interrupted run
            recovered = (
                ""
                if history is None
                else f", recovery loss {history['loss'][0]:.3f} -> {r['recovery']['last_loss']:.3f}"
            )
            log(
                f"[{done}/{cells}] {label} {s:.0%}: accuracy {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}], "
                f"ppl {_f(r['ppl'], 1)}{recovered} ({r['seconds']:.0f} s) {_load()}"
            )
    _paired_with_wanda(results, sparsities)
    res = save()
    if dense:
        _table(out, res, list(plan))
        _figures(out, res, list(plan))
    return res


def _load() -> str:
    """The 1-minute load average, for progress lines (the study runs on shared cores)."""
    return f"load {os.getloadavg()[0]:.1f}"


def _recovery_data(tokenizer, train_text: str | None, n: int, seq_len: int, seed: int) -> dict:
    """Recovery rows: n train-split problems (chain of thought, answer and </s> in the loss, as the
    organism was trained) plus n chunks of the training text (every token in the loss); problems
    only without the text."""
    from capjax.organism.train import problem_examples

    parts = [problem_examples(tokenizer, n, seq_len, seed)]
    if train_text is not None:
        parts.append(_text_calibration(tokenizer, train_text, n, seq_len, seed))
    return {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "loss_mask", "attention_mask")}


def recover_structured(model, dense_params, pruned, masks, data: dict, loss: str):
    """cap_structured's masked model after RECOVERY's short `capjax.recover` run: loss "ce" (NLL) or
    "distil" (KL from the dense model). Removed heads / channels stay exactly zero."""
    from capjax.recovery import recover

    kw = {"teacher": (model, dense_params)} if loss == "distil" else {}
    return recover(
        model,
        pruned,
        masks,
        data,
        steps=RECOVERY["steps"],
        lr=RECOVERY["lr"],
        warmup_steps=RECOVERY["warmup_steps"],
        batch_size=RECOVERY["batch_size"],
        mode="full",
        progress=False,
        **kw,
    )


def _paired_with_wanda(results: dict, sparsities) -> None:
    """Adds "vs_wanda" (paired bootstrap of the accuracy difference on the same problems) to every
    measured cell, when Wanda was measured."""
    from capjax import stats

    if "wanda" not in results:
        return
    for label, cells in results.items():
        for s in sparsities if label != "dense" else ():
            if "correct" not in cells.get(str(s), {}) or "correct" not in results["wanda"].get(str(s), {}):
                continue
            a, b = results["wanda"][str(s)]["correct"], cells[str(s)]["correct"]
            d = stats.paired_difference({"num": a, "den": [1] * len(a)}, {"num": b, "den": [1] * len(b)})
            cells[str(s)]["vs_wanda"] = {"diff": d.diff, "low": d.low, "high": d.high, "significant": d.significant}


LABELS = (
    "cap",
    "cap_paired",
    "gradient",
    "cap_wanda",
    "wanda",
    "sparsegpt",
    "magnitude",
    "random",
    "cap_text",
    "cap_heads",
    "cap_structured",
    "cap_structured+ce",
    "cap_structured+distil",
)


def merge(out: Path, parts: list[Path]) -> dict:
    """One reasoning.json (and its table and figures) from the reasoning.json files of runs that
    measured disjoint methods with the same sparsities, n and calibration (their dense results must
    agree); the paired tests against Wanda are recomputed across them."""
    runs = [json.loads((p / "reasoning.json").read_text()) for p in parts]
    first = runs[0]
    if "dense" not in first["results"]:
        raise SystemExit(f"{parts[0]}/reasoning.json: no dense result; list a part run without --no-dense first")
    for p, r in zip(parts, runs):
        for key in ("sparsities", "n", "calibration"):
            if r[key] != first[key]:
                raise SystemExit(f"{p}/reasoning.json: {key} {r[key]} differs from {parts[0]}'s {first[key]}")
        if "dense" in r["results"] and r["results"]["dense"]["correct"] != first["results"]["dense"]["correct"]:
            raise SystemExit(f"{p}/reasoning.json: the dense model's answers differ from {parts[0]}'s")
    complete = {}  # label -> (part, cells) with every sparsity measured (an interrupted part's last label is not)
    for p, r in zip(parts, runs):
        for label, cells in r["results"].items():
            if label == "dense" or len(cells) < len(first["sparsities"]):
                continue
            if label in complete:
                raise SystemExit(f"{p}/reasoning.json: {label} was measured by {complete[label][0]} too")
            complete[label] = (p, cells)
    for p, r in zip(parts, runs):
        for label in r["results"]:
            if label != "dense" and label not in complete:
                raise SystemExit(f"{p}/reasoning.json: {label} lacks sparsities and no other part measured it all")
    results = {"dense": first["results"]["dense"], **{k: v[1] for k, v in complete.items()}}
    scores = {}
    for r in runs:
        scores.update(r["head_scores"])
    _paired_with_wanda(results, first["sparsities"])
    res = {**first, "head_scores": scores, "results": results, "merged_from": [str(p) for p in parts]}
    (out / "reasoning.json").write_text(json.dumps(res, indent=1) + "\n")
    labels = [k for k in LABELS if k in results] + [k for k in results if k not in LABELS and k != "dense"]
    _table(out, res, labels)
    _figures(out, res, labels)
    return res


def removed_fraction(masks) -> float:
    """The fraction of the prunable kernels' weights that `masks` (True = kept) remove."""
    import jax

    leaves = jax.tree_util.tree_leaves(masks)
    return 1.0 - sum(float(np.sum(m)) for m in leaves) / sum(int(np.size(m)) for m in leaves)


STRUCTURED_TOLERANCE = 0.01  # a structured shape "matches" sparsity s when it removes s .. s + 1 point


def structured_options(config, sparsity: float) -> tuple[dict | None, str]:
    """cap_structured's options at `sparsity`: a parameter budget (heads and MLP channels cut alike,
    `capjax.structured.budget_shape`) removing the fewest whole layers (0, 1, 2) that makes the
    removed fraction of the decoder layers' parameters within STRUCTURED_TOLERANCE of `sparsity`;
    (None, why) when no shape does (the budget rounds to whole heads per kv group)."""
    from capjax.structured.method import shape_for
    from capjax.structured.plan import PlanError, layer_params

    total = layer_params(config)
    nearest = []
    for layers in (0, 1, 2):
        try:
            shape = shape_for(config, sparsity, {"layers": layers})
        except PlanError as e:
            nearest.append(f"layers={layers}: {e}")
            continue
        removed = 1.0 - layer_params(shape.config(config)) / total
        if removed - sparsity <= STRUCTURED_TOLERANCE:
            return {"layers": layers}, shape.describe(config)
        nearest.append(
            f"layers={layers}: the largest shape within the budget removes {removed:.1%} ({shape.describe(config)})"
        )
    return None, "; ".join(nearest)


def removed_by_head_count(model, params, head_scores) -> dict:
    """{"heads": L * H, "removed": [fraction of the prunable weights removed by cap_heads' masks with
    the k lowest-scoring heads removed, k = 0 .. L * H - 1]}: removing a head takes its q and o weights,
    and a kv head's k and v only when its whole group goes, so the fraction depends on which heads."""
    import capjax

    c = model.config
    total = c.num_layers * c.num_heads
    removed = [0.0]
    for k in range(1, total):  # all heads: sparsity 1, which prune refuses
        _, masks = capjax.prune(model, params, "cap_heads", k / total, head_scores=head_scores)
        removed.append(removed_fraction(masks))
    return {"heads": total, "removed": removed}


def head_options(fractions: dict, sparsity: float) -> tuple[float | None, str]:
    """cap_heads' head fraction at `sparsity`, matched by parameter count as cap_structured is: the
    fewest heads (lowest CAP score first) whose removal takes at least `sparsity` of the prunable
    weights, when that is within STRUCTURED_TOLERANCE of it; (None, why) otherwise. cap_heads leaves
    the MLPs whole, so it cannot go past the attention's share of the weights."""
    total, removed = fractions["heads"], fractions["removed"]
    for k in range(1, len(removed)):
        if removed[k] >= sparsity - 1e-12:
            if removed[k] - sparsity <= STRUCTURED_TOLERANCE:
                return k / total, f"{k} of {total} heads, {removed[k]:.1%} of the prunable weights"
            return None, (
                f"{k - 1} heads remove {removed[k - 1]:.1%}, {k} remove {removed[k]:.1%} of the prunable weights"
            )
    return None, (
        f"removing {len(removed) - 1} of {total} heads removes only {removed[-1]:.1%} of the prunable weights "
        "(the MLPs stay whole)"
    )


def label_kind(label: str) -> str:
    """ "recovery" (structured, then recovered), "structured" (whole heads / channels) or "unstructured"."""
    if "+" in label:
        return "recovery"
    return "structured" if label in ("cap_heads", "cap_structured") else "unstructured"


def _table(out: Path, res: dict, labels) -> None:
    """reasoning.md: an accuracy table (Wilson 95% and the paired difference with Wanda), a
    perplexity table, and the structured shapes."""
    sp = res["sparsities"]
    d = res["results"]["dense"]
    head = ["| method | " + " | ".join(f"{s:.0%}" for s in sp) + " |", "|---|" + "---|" * len(sp)]
    acc, ppl, shapes, recovered = list(head), list(head), [], []
    for label in labels:
        a_cells, p_cells = [], []
        for s in sp:
            r = res["results"][label][str(s)]
            if "accuracy" not in r:
                a_cells.append("n/a")
                p_cells.append("n/a")
                if "recovery" not in label_kind(label):
                    shapes.append(f"- {label} at {s:.0%}: not run: {r['note']}")
                continue
            vw = r.get("vs_wanda")
            mark = "" if vw is None or label == "wanda" else (f" ({vw['diff']:+.3f}{'*' if vw['significant'] else ''})")
            a_cells.append(f"{r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}]{mark}")
            p_cells.append(_f(r["ppl"], 1))
            if "recovery" in r:
                rc = r["recovery"]
                recovered.append(
                    f"- {label} at {s:.0%}: loss {rc['first_loss']:.3f} at step 1, {rc['last_loss']:.3f} over the "
                    f"last 10 of {rc['steps']} steps ({rc['seconds']:.0f} s)"
                )
            elif "options" in r:
                shapes.append(
                    f"- {label} at {s:.0%}: options {r['options']}, removes {r['removed']:.1%} of the prunable weights"
                )
        acc.append(f"| {label} | " + " | ".join(a_cells) + " |")
        ppl.append(f"| {label} | " + " | ".join(p_cells) + " |")
    lines = [
        f"Dense: accuracy {d['accuracy']:.3f} [{d['low']:.3f}, {d['high']:.3f}] (n = {d['n']}), "
        f"held-out perplexity {_f(d['ppl'], 1)}.",
        "",
        f"Greedy exact match on {res['n']} held-out problems [Wilson 95%] (accuracy minus Wanda's on the same "
        "problems; * = the paired bootstrap 95% interval excludes 0):",
        "",
        *acc,
        "",
        "Held-out WikiText-2 perplexity:",
        "",
        *ppl,
    ]
    if shapes:
        lines += ["", "Structured shapes:", "", *shapes]
    if recovered:
        rc = res["recovery"]
        lines += [
            "",
            f"Recovery (+ce: NLL, +distil: KL from the dense model at temperature 1): capjax.recover, full "
            f"fine-tuning of the kept weights, {rc['steps']} steps of {rc['batch_size']} packed rows, peak lr "
            f"{rc['lr']:g} (warmup {rc['warmup_steps']}, cosine), on {rc['n']} train-split problems and {rc['n']} "
            f"training-text chunks ({rc['rows']} examples of at most {rc['seq_len']} tokens, packed into rows):",
            "",
            *recovered,
        ]
    if "cap" in labels and "cap_text" in labels:
        lines += ["", *_two_by_two(res)]
    (out / "reasoning.md").write_text("\n".join(lines) + "\n")


def _two_by_two(res: dict) -> list[str]:
    """The 2 x 2 as markdown: CAP calibrated on problems (cap) vs on text (cap_text), accuracy with
    the paired difference on the same problems, and perplexity."""
    from capjax import stats

    lines = [
        "The 2 x 2 (CAP calibrated on word problems vs on text, same budget):",
        "",
        "| sparsity | accuracy: problems | accuracy: text | difference [paired 95%] | ppl: problems | ppl: text |",
        "|---|---|---|---|---|---|",
    ]
    for s in res["sparsities"]:
        a, b = res["results"]["cap"][str(s)], res["results"]["cap_text"][str(s)]
        d = stats.paired_difference(
            {"num": b["correct"], "den": [1] * b["n"]}, {"num": a["correct"], "den": [1] * a["n"]}
        )
        lines.append(
            f"| {s:.0%} | {a['accuracy']:.3f} | {b['accuracy']:.3f} | {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
            f"{' *' if d.significant else ''} | {_f(a['ppl'], 2)} | {_f(b['ppl'], 2)} |"
        )
    return lines


def _figures(out: Path, res: dict, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = res["sparsities"]
    x = np.array(sp) * 100
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors  # one colour per method (13 methods)
    for i, label in enumerate(labels):
        xs = np.array([100 * s for s in sp if "accuracy" in res["results"][label][str(s)]])
        rs = [res["results"][label][str(s)] for s in sp if "accuracy" in res["results"][label][str(s)]]
        if not rs:  # no sparsity expressible (cap_heads past the attention's share)
            continue
        acc = np.array([r["accuracy"] for r in rs])
        err = np.clip([[r["accuracy"] - r["low"] for r in rs], [r["high"] - r["accuracy"] for r in rs]], 0, None)
        style = {"structured": dict(ls="--"), "recovery": dict(ls="-.")}.get(label_kind(label), {})
        style["color"] = colors[(2 * i) % 20 + (2 * i) // 20]  # the dark shades first, then the light ones
        axes[0].errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=label, **style)
        if rs[0]["ppl"] is not None:
            axes[1].plot(xs, [r["ppl"] for r in rs], marker="o", label=label, **style)
    d = res["results"]["dense"]
    axes[0].axhline(d["accuracy"], color="k", ls=":", label="dense")
    axes[0].set(
        xlabel="sparsity (%)", ylabel=f"exact match (n = {res['n']}, Wilson 95%)", title="reasoning organism: accuracy"
    )
    if d["ppl"] is not None:
        axes[1].axhline(d["ppl"], color="k", ls=":", label="dense")
        axes[1].set_yscale("log")
    axes[1].set(xlabel="sparsity (%)", ylabel="held-out WikiText-2 perplexity", title="perplexity")
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_ppl_vs_sparsity.png", dpi=110)
    plt.close(fig)
    if "cap_text" not in labels:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, name in (("cap", "CAP calibrated on word problems"), ("cap_text", "CAP calibrated on text")):
        rs = [res["results"][label][str(s)] for s in sp]
        err = np.clip([[r["accuracy"] - r["low"] for r in rs], [r["high"] - r["accuracy"] for r in rs]], 0, None)
        axes[0].errorbar(x, [r["accuracy"] for r in rs], yerr=err, marker="o", capsize=3, label=name)
        axes[1].plot(x, [r["ppl"] for r in rs], marker="o", label=name)
    axes[0].set(xlabel="sparsity (%)", ylabel="exact match (Wilson 95%)", title="2 x 2: reasoning accuracy")
    axes[1].set(xlabel="sparsity (%)", ylabel="held-out perplexity", title="2 x 2: perplexity", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "two_by_two.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--part",
        choices=("all", "induction", "reasoning"),
        default="all",
        help="all: the induction part, then every reasoning method and the 2 x 2, in one process",
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "organism"))
    ap.add_argument("--reasoning", default=str(WEIGHTS / "reasoning"), help="the reasoning organism's folder")
    ap.add_argument(
        "--induction",
        nargs="+",
        default=[str(WEIGHTS / "induction"), str(WEIGHTS / "induction_h8")],
        help="induction organisms' folders (results: <out>/<folder name>.json / .md)",
    )
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--n", type=int, default=500, help="held-out problems per evaluation")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of the method labels (default: all)")
    ap.add_argument(
        "--recovery-steps",
        type=int,
        default=RECOVERY["steps"],
        help=f"optimizer steps of the +ce / +distil recovery (default {RECOVERY['steps']})",
    )
    ap.add_argument(
        "--redraw", action="store_true", help="only redraw the reasoning table and figures from <out>/reasoning.json"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="only merge the reasoning.json of these --out folders (runs of disjoint --methods) into --out",
    )
    ap.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the dense evaluation (a part of a split run; merge it after a part that has it)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    if args.merge:
        merge(out, [Path(p) for p in args.merge])
        return 0
    if args.redraw:
        res = json.loads((out / "reasoning.json").read_text())
        labels = [k for k in res["results"] if k != "dense"]
        _table(out, res, labels)
        _figures(out, res, labels)
        return 0
    if args.recovery_steps < 1:
        raise SystemExit(f"--recovery-steps must be a positive step count, got {args.recovery_steps}")
    RECOVERY["steps"] = args.recovery_steps
    timing: dict = {"load_average_1min": {"start": os.getloadavg()[0]}}
    log(f"start: --part {args.part}, n {args.n}, sparsities {args.sparsities} {_load()}")
    if args.part in ("induction", "all"):
        t = time.perf_counter()
        for folder in args.induction:
            induction_part(out, Path(folder), log)
        timing["induction_seconds"] = time.perf_counter() - t
        timing["load_average_1min"]["after_induction"] = os.getloadavg()[0]
    if args.part in ("reasoning", "all"):
        t = time.perf_counter()
        reasoning_part(out, Path(args.reasoning), args.sparsities, args.n, args.methods, log, dense=not args.no_dense)
        timing["reasoning_seconds"] = time.perf_counter() - t
    timing["load_average_1min"]["end"] = os.getloadavg()[0]
    (out / f"timing_{args.part}.json").write_text(json.dumps({**timing, "argv": sys.argv[1:]}, indent=1) + "\n")
    log(f"done: {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
