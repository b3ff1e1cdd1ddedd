"""`capjax run CONFIG`: score heads, prune with every method at every sparsity, evaluate, report.

Results folder layout (everything a rerun can reuse is kept):

    scores/<calib>.npz                head scores (delta, masked, baseline, settings)
    checkpoints/scores_<calib>/       orbax checkpoints of finished layer groups while scoring
    masks/<run>/                      orbax checkpoint of the run's weight masks
    evals/<run>/<task>.json           evaluation of each model on each task
    results.json, report.md           every number with its settings; the Table-1-shaped table
    figures/*.png                     head-score heatmaps, metrics vs sparsity, per-layer sparsity
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from capjax import report

from capjax.pruning import registry  # which methods need scores / calibration data


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def plan_runs(cfg: dict) -> list[dict]:
    """Every pruned model the config asks for: method x calibration set (where it matters) x sparsity."""
    p = cfg["pruning"]
    runs = []
    for method in p["methods"]:
        calibs = cfg["calibration"]["tasks"] if registry.spec(method).needs_calibration_data else [None]
        for calib in calibs:
            for s in p["sparsities"]:
                nm = p["nm"]
                name = "_".join([method, *([calib] if calib else []), f"s{float(s):.2f}"])
                if nm:
                    name += "_nm" + str(nm).replace(":", "-").replace(" ", "").strip("()[]").replace(",", "-")
                runs.append({"name": name, "method": method, "calib": calib, "sparsity": float(s), "nm": nm})
    return runs


def _eval_tasks(cfg: dict) -> list[str]:
    """Evaluation tasks, dropping those whose data is absent when skip_missing_data is set."""
    from capjax.data import resolve_data_dir

    tasks = list(cfg["evaluation"]["tasks"])
    if not cfg["evaluation"]["skip_missing_data"]:
        return tasks
    root = resolve_data_dir(cfg["data_dir"])
    need = {"wikitext2": "wikitext2/wiki.test.raw", "gsm8k": "gsm8k/test.jsonl", "strategyqa": "strategyqa/dev.json",
            "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
            "arc_challenge_cot": "arc_challenge/ARC-Challenge-Test.jsonl"}
    kept = [t for t in tasks if t not in need or (root is not None and (Path(root) / need[t]).exists())]
    for t in tasks:
        if t not in kept:
            _log(f"evaluation: skipping {t} (no data; pass data_dir or set CAPJAX_DATA)")
    return kept


class Experiment:
    """One config's run. Each step checks the results folder first and reuses what is there."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.out = Path(cfg["out"])
        self.model = self.params = self.tokenizer = None
        self.calibs: dict[str, Any] = {}
        self.events: list[str] = []  # "computed scores/synthetic", "reused evals/dense/..." (observable reuse)
        self.mesh = None
        if cfg["mesh"]:
            from capjax.sharding import make_mesh

            self.mesh = make_mesh(cfg["mesh"])

    # ------------------------------------------------------------------ inputs
    def load(self) -> None:
        import capjax

        _log(f"loading {self.cfg['model']} ({self.cfg['dtype']})")
        self.model, self.params = capjax.load_pretrained(self.cfg["model"], dtype=self.cfg["dtype"])
        self.tokenizer = capjax.load_tokenizer(self.cfg["model"])

    def calibration(self, task: str):
        from capjax.data import build_calibration

        if task not in self.calibs:
            c = self.cfg["calibration"]
            self.calibs[task] = build_calibration(task, self.tokenizer, n=c["n"], seq_len=c["seq_len"],
                                                  seed=self.cfg["seed"], data_dir=self.cfg["data_dir"],
                                                  chat=c["chat"])
            if self.calibs[task].n_truncated:
                _log(f"calibration {task}: {self.calibs[task].n_truncated} of {c['n']} examples truncated "
                     f"to {c['seq_len']} tokens")
        return self.calibs[task]

    # ------------------------------------------------------------------ steps
    def scores(self, task: str):
        from capjax.attribution import HeadScores, score_heads

        path = self.out / "scores" / f"{task}.npz"
        if path.exists():
            self.events.append(f"reused scores/{task}")
            _log(f"scores: reusing {path}")
            return HeadScores.load(path)
        c = self.cfg["calibration"]
        calib = self.calibration(task)
        L, H = self.model.config.num_layers, self.model.config.num_heads
        _log(f"scores: {c['method']} scoring of {L * H} heads on {task} (N={c['n']}, T={c['seq_len']}, "
             f"K={c['subsets']}, {c['aggregate']})")
        t0 = time.perf_counter()
        s = score_heads(self.model, self.params, calib.tokens, calib.loss_mask, subsets=c["subsets"],
                        aggregate=c["aggregate"], method=c["method"], attention_mask=calib.attention_mask,
                        chunk_size=c["chunk_size"], checkpoint_dir=self.out / "checkpoints" / f"scores_{task}",
                        mesh=self.mesh)
        seconds = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        s.save(path, calib=task, n=c["n"], seq_len=c["seq_len"], seed=self.cfg["seed"], seconds=seconds)
        self.events.append(f"computed scores/{task}")
        _log(f"scores: done in {seconds:.1f} s -> {path}")
        return s

    def pruned(self, run: dict, head_scores) -> tuple[Any, Any]:
        """(pruned params, masks) for a run, restoring saved masks where the method only masks."""
        from capjax.pruning import prune
        from capjax.pruning.prune import apply_masks

        ckpt = self.out / "masks" / run["name"]
        if ckpt.exists() and run["method"] != "sparsegpt":  # sparsegpt also updates weights: recompute
            masks = _restore_masks(ckpt, self.params)
            self.events.append(f"reused masks/{run['name']}")
            return apply_masks(self.params, masks), masks
        calib = self.calibration(run["calib"]) if run["calib"] else None
        options = dict(self.cfg["pruning"]["options"].get(run["method"], {}))
        if run["method"] == "random":
            options.setdefault("seed", self.cfg["seed"])
        pruned, masks = prune(self.model, self.params, run["method"], run["sparsity"], head_scores=head_scores,
                              calib=calib, nm=run["nm"], mesh=self.mesh, **options)
        _save_masks(ckpt, masks)
        self.events.append(f"computed masks/{run['name']}")
        return pruned, masks

    def evaluate(self, name: str, params, tasks: list[str]) -> dict:
        from capjax.evaluate import evaluate

        e = self.cfg["evaluation"]
        results = {}
        for task in tasks:
            path = self.out / "evals" / name / f"{task}.json"
            if path.exists():
                results[task] = json.loads(path.read_text())
                self.events.append(f"reused evals/{name}/{task}")
                continue
            limit = e["limit"].get(task) if isinstance(e["limit"], dict) else e["limit"]
            r = evaluate(self.model, params, self.tokenizer, [task], data_dir=self.cfg["data_dir"], limit=limit,
                         seed=self.cfg["seed"], max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"],
                         chat=self.cfg["calibration"]["chat"], seq_len=e["ppl_seq_len"],
                         model_name=str(self.cfg["model"]))
            results[task] = r["results"][task]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results[task], indent=2, default=float))
            self.events.append(f"computed evals/{name}/{task}")
        return results

    # ------------------------------------------------------------------ the whole thing
    def run(self) -> dict:
        from capjax.pruning import sparsity_report

        t_start = time.perf_counter()
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "figures").mkdir(exist_ok=True)
        tasks = _eval_tasks(cfg)
        if not tasks:
            raise ValueError("no evaluation task left to run (all need data that is missing)")
        self.load()
        runs = plan_runs(cfg)
        needs_scores = any(registry.spec(r["method"]).needs_scores for r in runs)
        scores = {}
        for task in cfg["calibration"]["tasks"] if needs_scores else []:
            scores[task] = self.scores(task)
            report.plot_head_scores(scores[task].delta, self.out / "figures" / f"head_scores_{task}.png",
                                    title=f"CAP head scores: {cfg['model']} on {task} ({scores[task].aggregate})")
        _log(f"[1/{len(runs) + 1}] dense model: evaluating {', '.join(tasks)}")
        rows = [{"name": "dense", "method": "dense", "calib": None, "sparsity": 0.0, "nm": None,
                 "achieved_sparsity": sparsity_report(self.params).total,
                 "eval": self.evaluate("dense", self.params, tasks)}]
        for i, run in enumerate(runs, 2):
            _log(f"[{i}/{len(runs) + 1}] {run['name']}: pruning and evaluating")
            pruned, masks = self.pruned(run, scores.get(run["calib"]))
            rep = sparsity_report(pruned)
            rows.append({**run, "achieved_sparsity": rep.total,
                         "per_layer_sparsity": [rep.layer(l) for l in range(rep.num_layers)],
                         "eval": self.evaluate(run["name"], pruned, tasks)})
            del pruned, masks
        for row in rows:
            row["metrics"] = flat_metrics(row["eval"])
        results = {"config": cfg, "runs": rows,
                   "scores": {t: {"file": f"scores/{t}.npz", "baseline": s.baseline.tolist(),
                                  "delta": s.delta.tolist()} for t, s in scores.items()},
                   "seconds": time.perf_counter() - t_start, "events": self.events}
        if jax.process_index() == 0:
            write_outputs(self.out, results)
        return results


def flat_metrics(evals: dict[str, dict]) -> dict[str, float]:
    """{"task": {"metric": v}} -> {"task/metric": v}, keeping the headline metrics only."""
    keep = {"wikitext2": ("ppl",), "gsm8k": ("exact_match_strict", "exact_match_flexible"),
            "strategyqa": ("accuracy",), "arc_challenge": ("acc", "acc_norm"), "arc_challenge_cot": ("accuracy",),
            "synthetic": ("accuracy_flexible", "answer_loss")}
    return {f"{t}/{m}": float(v[m]) for t, v in evals.items() for m in keep.get(t, ()) if m in v}


def write_outputs(out: Path, results: dict) -> None:
    rows = results["runs"]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    report.plot_metric_curves(rows, out / "figures" / "metrics_vs_sparsity.png")
    figures = sorted(p.name for p in (out / "figures").glob("head_scores_*.png")) + ["metrics_vs_sparsity.png"]
    for s in sorted({r["sparsity"] for r in rows if r["method"] != "dense"}):
        per_layer = {r["name"]: r["per_layer_sparsity"] for r in rows
                     if r["sparsity"] == s and r.get("per_layer_sparsity")}
        if per_layer:
            name = f"layer_sparsity_s{s:.2f}.png"
            report.plot_layer_sparsity(per_layer, out / "figures" / name, title=f"per-layer sparsity at {s:.0%}")
            figures.append(name)
    cfg = results["config"]
    c = cfg["calibration"]
    md = [f"# capjax run: {cfg['model']}", "",
          f"Calibration: {', '.join(c['tasks'])} (N={c['n']}, T={c['seq_len']}, K={c['subsets']}, {c['aggregate']}, "
          f"{c['method']}); evaluation limit {cfg['evaluation']['limit']}; dtype {cfg['dtype']}; seed {cfg['seed']}.",
          "Relative change against the dense model in parentheses.", "",
          report.markdown_table(rows, relative_to=rows[0]), "",
          "Achieved sparsity of the prunable weights: " + ", ".join(
              f"{r['name']} {r['achieved_sparsity']:.4f}" for r in rows if r["method"] != "dense"), "",
          *[f"![{f}](figures/{f})" for f in figures], "",
          f"Total time {results['seconds']:.0f} s."]
    (out / "report.md").write_text("\n".join(md) + "\n")


def _save_masks(path: Path, masks) -> None:
    import orbax.checkpoint as ocp

    from capjax.pruning.prune import flat_masks

    # orbax keys are path segments on disk: "/" inside a key would nest folders.
    flat = {k.replace("/", "."): np.asarray(v) for k, v in flat_masks(masks).items()}
    ocp.PyTreeCheckpointer().save(path.absolute(), flat, force=True)


def _restore_masks(path: Path, params):
    import orbax.checkpoint as ocp

    from capjax.pruning.prune import masks_from_flat

    flat = ocp.PyTreeCheckpointer().restore(path.absolute())
    return masks_from_flat(params, {k.replace(".", "/"): v for k, v in flat.items()})
