"""`capjax run CONFIG`: score heads, prune with every method at every sparsity, evaluate, report.

Results folder layout:

    artifacts/scores/<fp>.npz       head scores: per-subset and per-example losses (any aggregate)
    artifacts/masks/<fp>.npz        weight masks of one pruned model (+ weights a method changed)
    artifacts/evals/<fp>.json       one model on one task: metrics and per-example values
    artifacts/recovery/<fp>.json    loss history of one recovery run (the `recovery:` section)
    checkpoints/scores/             orbax checkpoints of finished layer groups while scoring (each
                                    stamped with the code version; --recompute resumes from none)
    checkpoints/recovery/<fp>/      orbax checkpoints of a recovery run (resume; --recompute clears them)
    results.json, results.csv       every number with its interval, fingerprint and computed/reused
    report.md                       the Table-1-shaped table with error bars
    figures/*.png                   head-score heatmaps, metrics vs sparsity, per-layer sparsity

Every artifact is filed under the fingerprint of everything that determines it (see
`capjax.experiment.store`): the model's files, the calibration tokens and settings, the scoring,
pruning and evaluation settings. A rerun reuses exactly the artifacts whose inputs did not change.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from capjax import estimators, report
from capjax.artifacts import array_digest, fingerprint, warn
from capjax.distributed import barrier, is_writer, to_host
from capjax.errors import NonFiniteError
from capjax.experiment.config import RunConfig, data_files, method_options, missing_eval_tasks
from capjax.experiment.outputs import sparsity_label, write_outputs
from capjax.experiment.store import Store
from capjax.provenance import code_digest, code_version, environment


def _log(msg: str) -> None:
    if is_writer():
        print(msg, flush=True)


def pack_masks(masks, pruned=None) -> tuple[dict[str, np.ndarray], dict]:
    """The masks of one pruned model as bit-packed host arrays {"mask:<path>": uint8} (gathered from
    every process), plus the prunable kernels of `pruned` when a method changed the kept weights."""
    from capjax.pruning.importance import get_kernels
    from capjax.pruning.prune import flat_masks

    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"shapes": {}}
    for path, m in flat_masks(masks).items():
        m = np.asarray(to_host(m), bool)
        arrays[f"mask:{path}"] = np.packbits(m.reshape(-1))
        meta["shapes"][path] = list(m.shape)
    if pruned is not None:
        arrays.update({f"kernel:{p}": to_host(w) for p, w in get_kernels(pruned).items()})
    return arrays, meta


def unpack_masks(saved: dict[str, np.ndarray], params) -> tuple[Any, Any]:
    """(masks tree, params with any saved kernels in place) from `pack_masks`' arrays; a ValueError
    when they do not fit `params`."""
    import json

    import jax.numpy as jnp

    from capjax.pruning.importance import PRUNABLE, get_kernels, get_path
    from capjax.pruning.prune import masks_from_flat, replace_kernels

    shapes = json.loads(str(saved["meta"]))["shapes"]
    flat = {}
    for p in PRUNABLE:
        shape = tuple(shapes[p])
        if shape != tuple(get_path(params, p).shape):
            raise ValueError(f"{p} mask shape {shape}")
        flat[p] = np.unpackbits(saved[f"mask:{p}"], count=int(np.prod(shape))).astype(bool).reshape(shape)
    kernels = {p: saved[f"kernel:{p}"] for p in PRUNABLE if f"kernel:{p}" in saved}
    if kernels:
        current = get_kernels(params)
        params = replace_kernels(params, {p: jnp.asarray(w, current[p].dtype) for p, w in kernels.items()})
    return masks_from_flat(params, flat), params


def plan_runs(cfg: RunConfig) -> list[dict]:
    """Every pruned model the config asks for: method x calibration set (where it matters) x sparsity."""
    from capjax.pruning.methods import METHODS

    p = cfg.pruning
    runs = []
    for method in p.methods:
        spec = METHODS[method]
        calibs = cfg.calibration.tasks if (spec.needs_calib or spec.needs_scores) else [None]
        for calib in calibs:
            for s in p.targets():
                name = "_".join([method, *([calib] if calib else []), f"s{sparsity_label(s)}"])
                if p.nm:
                    name += "_nm" + p.nm.replace(":", "-")
                runs.append({"name": name, "method": method, "calib": calib, "sparsity": float(s), "nm": p.nm})
    return runs


class Experiment:
    """One config's run. Each step looks up its artifact by fingerprint first and reuses it only
    when everything that determines it is unchanged."""

    def __init__(self, cfg: RunConfig, recompute: bool = False):
        self.cfg = cfg
        if cfg.out is None:
            raise ValueError("RunConfig.out is not set: set out= (load_run_config sets results/NAME)")
        self.out = Path(cfg.out)
        self.store = Store(self.out, writer=is_writer(), read=not recompute)
        # set by load()
        self.model: Any = None
        self.params: Any = None
        self.tokenizer: Any = None
        self.model_fp: Any = None
        self.calibs: dict[str, Any] = {}
        self.calib_fps: dict[str, str] = {}
        self.events: list[str] = []  # "computed scores/synthetic", "reused evals/dense/..." (observable reuse)
        self.mesh = None
        if cfg.mesh:
            from capjax.sharding import make_mesh

            self.mesh = make_mesh(cfg.mesh)

    def _event(self, status: str, what: str, path: Path, saved: dict | None = None) -> None:
        """Records "computed X" or "reused X" (`saved`: the reused artifact); one that other capjax
        code computed is recorded as "reused X (computed by capjax V)" and said in one line."""
        note = ""
        if status == "reused":
            code = Store.code_of(saved or {})
            if code == code_version():
                _log(f"{what}: reusing {path}")
            else:
                by = f"computed by capjax {code or 'of an unrecorded version'}"
                note = f" ({by})"
                _log(
                    f"{what}: reusing {path}, {by} (this is {code_version()}; `capjax run --recompute` "
                    "recomputes everything)"
                )
        self.events.append(f"{status} {what}{note}")

    # ------------------------------------------------------------------ inputs
    def load(self) -> None:
        import capjax
        from capjax.io import model_files

        _log(f"loading {self.cfg.model} ({self.cfg.dtype})")
        # With a mesh, each param is placed as it is read: a process keeps only its devices' shards.
        self.model, self.params = capjax.load_pretrained(self.cfg.model, dtype=self.cfg.dtype, mesh=self.mesh)
        self.tokenizer = capjax.load_tokenizer(self.cfg.model)
        files = {p.name: self.store.digest(p) for p in model_files(self.cfg.model)}
        self.model_fp = fingerprint({"source": self.cfg.model, "dtype": self.cfg.dtype, "files": files})

    def _data_digest(self, what: str) -> str | None:
        from capjax.data.sources import resolve_data_dir

        rel = data_files(self.cfg).get(what)
        root = resolve_data_dir(self.cfg.data_dir)
        if rel is None or root is None or not (root / rel).is_file():
            return None
        return self.store.digest(root / rel)

    def calibration(self, task: str):
        from capjax.data import build_calibration
        from capjax.data.task import get_task

        if task not in self.calibs:
            c = self.cfg.calibration
            batch = build_calibration(
                task,
                self.tokenizer,
                n=c.n,
                seq_len=c.seq_len,
                seed=self.cfg.seed,
                data_dir=self.cfg.data_dir,
                chat=c.chat,
            )
            if batch.n_truncated:
                _log(f"calibration {task}: {batch.n_truncated} of {c.n} examples truncated to {c.seq_len} tokens")
            self.calibs[task] = batch
            self.calib_fps[task] = fingerprint(
                {
                    "task": task,
                    "split": get_task(task).calib_split,
                    "n": c.n,
                    "seq_len": c.seq_len,
                    "seed": self.cfg.seed,
                    "chat": c.chat,
                    "data": self._data_digest(f"calibration.tasks {task}"),
                    "tokens": array_digest(batch.tokens, batch.loss_mask, batch.attention_mask),
                }
            )
        return self.calibs[task]

    # ------------------------------------------------------------------ steps
    def scores_fingerprint(self, task: str) -> str:
        c = self.cfg.calibration
        self.calibration(task)
        inputs: dict[str, Any] = {
            "model": self.model_fp,
            "calibration": self.calib_fps[task],
            "subsets": c.subsets,
            "method": c.method,
        }
        if (c.kind, c.metric) != ("zero", "ce"):  # so that zero / ce artifacts from before still match
            inputs["ablation"] = {"kind": c.kind, "metric": c.metric}
        from capjax.ablation.kinds import kind_function
        from capjax.ablation.metrics import get_metric

        plugin = code_digest(get_metric(c.metric).fn)  # a plugin metric's code (None: capjax's own)
        if plugin is not None:
            inputs["ablation"]["metric_code"] = plugin
        kind_fn = kind_function(c.kind)  # a plugin kind's code (None: a built-in)
        if kind_fn is not None and (kind_code := code_digest(kind_fn)) is not None:
            inputs["ablation"]["kind_code"] = kind_code
        return fingerprint(inputs)

    def scores(self, task: str):
        """HeadScores on a calibration set. A change of aggregate alone re-aggregates the saved
        per-subset losses; chunking and progress settings do not count."""
        from capjax.attribution import HeadScores, score_heads

        c = self.cfg.calibration
        fp = self.scores_fingerprint(task)
        saved = self.store.load_npz("scores", fp, required=("delta", "masked", "baseline"))
        if saved is not None:
            s = HeadScores.from_arrays(saved)
            self._event("reused", f"scores/{task}", self.store.path("scores", fp), saved)
        else:
            calib = self.calibs[task]
            L, H = self.model.config.num_layers, self.model.config.num_heads
            _log(
                f"scores: {c.method} scoring of {L * H} heads on {task} (N={c.n}, T={c.seq_len}, "
                f"K={c.subsets}, {c.kind} ablation, {c.metric})"
            )
            t0 = time.perf_counter()
            s = score_heads(
                self.model,
                self.params,
                calib.tokens,
                calib.loss_mask,
                subsets=c.subsets,
                aggregate=c.aggregate,
                method=c.method,
                attention_mask=calib.attention_mask,
                chunk_size=c.chunk_size,
                checkpoint_dir=self.out / "checkpoints" / "scores",
                mesh=self.mesh,
                kind=c.kind,
                metric=c.metric,
                resume=self.store.read,
            )
            seconds = time.perf_counter() - t0
            from capjax.identity import model_identity

            path = self.store.save_npz(
                "scores",
                fp,
                {k: v for k, v in s.arrays().items() if k != "interval"},
                {
                    "calib": task,
                    "seconds": seconds,
                    **s.settings(),
                    "model": self.cfg.model,
                    "model_id": model_identity(self.cfg.model),
                },
            )  # for capjax prune --scores
            self._event("computed", f"scores/{task}", path)
            _log(f"scores: done in {seconds:.1f} s -> {path}")
        s = s.with_aggregate(c.aggregate)
        if c.bootstrap and s.example_masked is not None:
            s = s.with_interval(c.bootstrap, seed=self.cfg.seed)
        return fp, s

    def pruned(self, run: dict, scores: tuple[str, Any] | None) -> tuple[str, Any, Any]:
        """(fingerprint, pruned params, masks) of a run; saved masks (and the weights a method
        changed, e.g. SparseGPT's) are reused when every input matches."""
        from capjax.pruning import prune
        from capjax.pruning.methods import METHODS
        from capjax.pruning.prune import apply_masks

        spec = METHODS[run["method"]]
        options = method_options(self.cfg, run["method"])
        inputs: dict[str, Any] = {
            "model": self.model_fp,
            "method": run["method"],
            "sparsity": run["sparsity"] if not run["nm"] else 0.0,
            "nm": run["nm"],
            "options": options,
        }
        plugin = code_digest(spec.fn)  # a plugin method's code (None: capjax's own, see code_version)
        if plugin is not None:
            inputs["code"] = plugin
        if spec.needs_scores:
            assert scores is not None  # run() passes the scores of every run that needs them
            inputs["scores"] = {"fingerprint": scores[0], "aggregate": scores[1].aggregate}
            if scores[1].aggregate in estimators.names():
                plugin = code_digest(estimators.get(scores[1].aggregate))
                if plugin is not None:
                    inputs["scores"]["aggregate_code"] = plugin
        if spec.needs_calib:
            self.calibration(run["calib"])
            inputs["calibration"] = self.calib_fps[run["calib"]]
        fp = fingerprint(inputs)
        saved = self.store.load_npz("masks", fp)
        if saved is not None:
            try:
                masks, params = unpack_masks(saved, self.params)
            except ValueError as e:
                warn(f"{self.store.path('masks', fp)} does not fit this model ({e}); recomputing it")
            else:
                self._event("reused", f"masks/{run['name']}", self.store.path("masks", fp), saved)
                return fp, apply_masks(params, masks), masks
        calib = self.calibs[run["calib"]] if spec.needs_calib else None
        pruned, masks = prune(
            self.model,
            self.params,
            run["method"],
            0.0 if run["nm"] else run["sparsity"],
            head_scores=scores[1] if spec.needs_scores and scores else None,
            calib=calib,
            nm=run["nm"],
            mesh=self.mesh,
            **options,
        )
        summary = spec.summarize(self.model.config, to_host(masks)) if spec.summary is not None else None
        if summary:
            _log(f"{run['name']}: {summary}")
        # what the method declares it produces is what is saved (and reused): masks, and new kept weights
        arrays, meta = pack_masks(masks, pruned if spec.changes_weights else None)
        meta["run"] = run["name"]
        path = self.store.save_npz("masks", fp, arrays, meta)
        self._event("computed", f"masks/{run['name']}", path)
        return fp, pruned, masks

    def recovered(
        self, run: dict, pruned_fp: str, pruned, masks, tasks: list[str], distil: bool = False
    ) -> tuple[dict, dict]:
        """(row, history) of a pruned model after recovery fine-tuning (cfg.recovery); with `distil`,
        the same recovery as logit distillation from the dense model (a "+distil" row). The loss
        history and each evaluation are artifacts keyed by the pruned model and the settings; the
        run itself resumes from its orbax checkpoints."""
        import dataclasses

        from capjax.pruning import sparsity_report
        from capjax.recovery.settings import DISTIL_FIELDS

        settings = self.cfg.recovery
        text = settings.data[len("text:") :] if settings.data.startswith("text:") else None
        inputs = {k: v for k, v in dataclasses.asdict(settings).items() if distil or k not in DISTIL_FIELDS}
        fp = fingerprint(
            {
                "pruned": pruned_fp,
                "recovery": inputs,
                "data": self.store.digest(Path(text))
                if text is not None
                else self._data_digest(f"recovery.data {settings.data}"),
                **({"teacher": self.model_fp} if distil else {}),
            }
        )
        suffix = "distil" if distil else "recovery"
        name = f"{run['name']}+{suffix}"
        saved = self.store.load_json("recovery", fp, required=("history",))
        recovered: dict[str, Any] = {}

        def params():  # run only when an evaluation has to be computed (it resumes from checkpoints)
            if not recovered:
                from capjax.recovery import run_recovery

                _log(f"{name}: {settings.steps} recovery steps ({settings.mode}, data {settings.data})")
                checkpoints = self.out / "checkpoints" / "recovery" / fp
                if not self.store.read:  # --recompute: no resuming from an earlier run's steps either
                    if is_writer():
                        shutil.rmtree(checkpoints, ignore_errors=True)
                    barrier(f"capjax recompute {fp}")
                out, history = run_recovery(
                    self.model,
                    pruned,
                    masks,
                    self.tokenizer,
                    settings,
                    checkpoint_dir=checkpoints,
                    mesh=self.mesh,
                    data_dir=self.cfg.data_dir,
                    teacher=(self.model, self.params) if distil else None,
                )
                recovered.update(
                    params=out,
                    achieved_sparsity=sparsity_report(out).total,
                    history={k: np.asarray(v).tolist() for k, v in history.items() if k in ("loss", "lr")},
                )
                path = self.store.save_json(
                    "recovery",
                    fp,
                    {"history": recovered["history"], "achieved_sparsity": recovered["achieved_sparsity"]},
                )
                self._event("computed", f"recovery/{name}", path)
            return recovered["params"]

        if saved is None:
            params()
        evals = self.evaluate(name, params, fp, tasks)
        if not recovered:
            assert saved is not None  # params() ran (and filled recovered) unless it was saved
            recovered.update(history=saved["history"], achieved_sparsity=saved.get("achieved_sparsity"))
            self._event("reused", f"recovery/{name}", self.store.path("recovery", fp), saved)
        row = {
            **run,
            "name": name,
            "method": f"{run['method']}+{suffix}",
            "fingerprint": fp,
            "masks_status": "computed" if "params" in recovered else "reused",
            "achieved_sparsity": recovered["achieved_sparsity"],
            "eval": evals,
        }
        return row, recovered["history"]

    def eval_fingerprint(self, params_fp: str, task: str) -> str:
        """Each evaluation reads only the settings that change its result (its task's
        `fingerprint_settings`; padded batches: batch size can move results in the last digits),
        and a plugin task's code."""
        from capjax.data.task import TASKS, resolve

        e = self.cfg.evaluation
        t = TASKS.lookup(task)
        inputs: dict[str, Any] = {
            "model": params_fp,
            "task": task,
            "limit": e.limit_for(task),
            "seed": self.cfg.seed,
            "chat": self.cfg.calibration.chat,
            "data": self._data_digest(f"evaluation.tasks {task}"),
        }
        inputs.update({k: getattr(e, k) for k in t.fingerprint_settings})
        if task not in TASKS.builtin_names():  # a registered task: its code and prompt text count too
            inputs["code"] = {
                "instruction": t.instruction,
                "functions": [
                    code_digest(resolve(f))
                    for f in (t.load, t.generate, t.question, t.answer, t.score, t.run)
                    if f is not None
                ],
            }
        return fingerprint(inputs)

    def evaluate(self, name: str, params, params_fp: str, tasks: list[str]) -> dict[str, dict]:
        """{task: {"metrics", "examples", "fingerprint", "status"}} for one model. `params` may be a
        function that makes them, called only if some task has no saved evaluation."""
        from capjax.evaluate import evaluate

        e = self.cfg.evaluation
        results = {}
        for task in tasks:
            fp = self.eval_fingerprint(params_fp, task)
            saved = self.store.load_json("evals", fp, required=("metrics", "examples"))
            if saved is not None:
                results[task] = {**saved, "status": "reused"}
                self._event("reused", f"evals/{name}/{task}", self.store.path("evals", fp), saved)
                continue
            if callable(params):
                params = params()
            r = evaluate(
                self.model,
                params,
                self.tokenizer,
                [task],
                data_dir=self.cfg.data_dir,
                limit=e.limit_for(task),
                seed=self.cfg.seed,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                chat=self.cfg.calibration.chat,
                seq_len=e.ppl_seq_len,
                model_name=self.cfg.model,
            )
            metrics = r["results"][task]
            bad = [k for k, v in metrics.items() if isinstance(v, float) and not np.isfinite(v)]
            if bad:
                raise NonFiniteError(
                    f"{name} on {task}: {', '.join(f'{k}={metrics[k]}' for k in bad)} "
                    "(NaN/Inf weights or overflow; try dtype=float32)"
                )
            data = {
                "model": name,
                "task": task,
                "metrics": metrics,
                "examples": r["examples"][task],
                "settings": r["settings"],
            }
            path = self.store.save_json("evals", fp, data)
            results[task] = {**data, "fingerprint": fp, "status": "computed"}
            self._event("computed", f"evals/{name}/{task}", path)
        return results

    # ------------------------------------------------------------------ the whole thing
    def run(self) -> dict:
        """Runs everything holding the results folder's lock (`capjax.experiment.folders`): a
        second run into the same `out` is refused in one line naming this one."""
        import contextlib

        from capjax.experiment.folders import results_lock

        with results_lock(self.out) if is_writer() else contextlib.nullcontext():
            return self._run()

    def _run(self) -> dict:
        from capjax.pruning import sparsity_report
        from capjax.pruning.methods import METHODS

        t_start = time.perf_counter()
        cfg = self.cfg
        (self.out / "figures").mkdir(parents=True, exist_ok=True)
        tasks = list(cfg.evaluation.tasks)
        if cfg.evaluation.skip_missing_data:
            for t in missing_eval_tasks(cfg):
                _log(f"evaluation: skipping {t} (no data; pass data_dir or set CAPJAX_DATA)")
                tasks.remove(t)
        if not tasks:
            raise ValueError("no evaluation task left to run (all need data that is missing)")
        self.load()
        runs = plan_runs(cfg)
        for r in runs:  # a target the model cannot take (e.g. structured) is refused before any compute
            line = METHODS[r["method"]].planned(self.model.config, r["sparsity"], method_options(cfg, r["method"]))
            if line:
                _log(f"{r['name']}: {line}")
        scores: dict[str, tuple[str, Any]] = {}
        for task in cfg.calibration.tasks if any(METHODS[r["method"]].needs_scores for r in runs) else []:
            scores[task] = self.scores(task)
            s = scores[task][1]
            if is_writer():
                report.plot_head_scores(
                    s.delta,
                    self.out / "figures" / f"head_scores_{task}.png",
                    title=f"CAP head scores: {cfg.model} on {task} ({s.describe()})",
                    interval=s.interval,
                )
        _log(f"[1/{len(runs) + 1}] dense model: evaluating {', '.join(tasks)}")
        rows: list[dict[str, Any]] = [
            {
                "name": "dense",
                "method": "dense",
                "calib": None,
                "sparsity": 0.0,
                "nm": None,
                "fingerprint": self.model_fp,
                "achieved_sparsity": sparsity_report(self.params).total,
                "eval": self.evaluate("dense", self.params, self.model_fp, tasks),
            }
        ]
        histories: dict[str, dict] = {}
        for i, run in enumerate(runs, 2):
            _log(f"[{i}/{len(runs) + 1}] {run['name']}: pruning and evaluating")
            fp, pruned, masks = self.pruned(run, scores.get(run["calib"]))
            rep = sparsity_report(pruned)
            rows.append(
                {
                    **run,
                    "fingerprint": fp,
                    "masks_status": self.events[-1].split()[0],
                    "achieved_sparsity": rep.total,
                    "per_layer_sparsity": [rep.layer(l) for l in range(rep.num_layers)],
                    "eval": self.evaluate(run["name"], pruned, fp, tasks),
                }
            )
            if cfg.recovery is not None:
                row, histories[run["name"]] = self.recovered(run, fp, pruned, masks, tasks)
                rows.append(row)
                if cfg.recovery.distil:  # the same steps as distillation from the dense model
                    row, histories[f"{run['name']} (distil)"] = self.recovered(
                        run, fp, pruned, masks, tasks, distil=True
                    )
                    rows.append(row)
            del pruned, masks
        if histories and is_writer():
            from capjax.recovery import plot_loss_curves

            plot_loss_curves(histories, self.out / "figures" / "recovery_loss.png", title=f"recovery loss: {cfg.model}")
        results = {
            "config": cfg.to_dict(),
            "environment": environment(),
            "runs": rows,
            "scores": {
                t: {
                    "fingerprint": fp,
                    "file": str(self.store.path("scores", fp).relative_to(self.out)),
                    **s.settings(),
                    "baseline": s.baseline.tolist(),
                    "delta": s.delta.tolist(),
                    "interval": None if s.interval is None else s.interval.tolist(),
                }
                for t, (fp, s) in scores.items()
            },
            "seconds": time.perf_counter() - t_start,
            "events": self.events,
        }
        if is_writer():
            write_outputs(self.out, results, cfg.evaluation.bootstrap, cfg.seed)
        return results
