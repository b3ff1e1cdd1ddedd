"""What a run leaves for people and tools: results.json, results.csv, report.md and figures.

Every reported number carries its interval (capjax.stats: Wilson for accuracies, a bootstrap
over examples or windows for losses and perplexity), the fingerprint of the artifact it came
from, and whether this run computed or reused it. A pruned model's difference to dense gets a
paired bootstrap over the same examples; one whose interval contains zero is marked "n.s.".
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from capjax import report, stats
from capjax.experiment.store import strict_json, write_texts
from capjax.provenance import describe

CSV_COLUMNS = (
    "name",
    "method",
    "calib",
    "target_sparsity",
    "achieved_sparsity",
    "metric",
    "value",
    "stderr",
    "ci_low",
    "ci_high",
    "n",
    "interval",
    "diff_vs_dense",
    "diff_low",
    "diff_high",
    "within_noise",
    "fingerprint",
    "status",
)


def sparsity_label(s: float) -> str:
    """A sparsity as run and figure names show it: two decimals ("0.10") when they are the exact
    value, else the shortest exact form ("0.104"), so distinct sparsities never share a name."""
    two = f"{s:.2f}"
    return two if float(two) == float(s) else repr(float(s))


def headline(task: str, ev: dict) -> tuple[str, ...]:
    """The metrics of `task` the report shows: its Task's `headline`, else every metric with
    per-example values (a task no longer registered: the latter)."""
    from capjax.data.task import TASKS

    shown = TASKS[task].headline if task in TASKS else ()
    return shown or tuple(ev.get("examples", {}))


def annotate(rows: list[dict], resamples: int = 1000, seed: int = 0) -> None:
    """Adds to each row metrics {task/metric: value}, intervals {task/metric: Estimate},
    vs_dense {task/metric: PairedDifference} and status (computed / reused / partly reused)."""
    dense = rows[0]
    for row in rows:
        row["metrics"], row["intervals"], row["vs_dense"], row["eval_status"] = {}, {}, {}, {}
        for task, ev in row["eval"].items():
            for m in headline(task, ev):
                if m not in ev["metrics"]:
                    continue
                key = f"{task}/{m}"
                row["metrics"][key] = float(ev["metrics"][m])
                row["eval_status"][key] = ev["status"]
                ex = ev.get("examples", {}).get(m)
                if ex is None:
                    continue
                row["intervals"][key] = stats.estimate(ex, resamples, seed).to_dict()
                base = dense["eval"].get(task, {}).get("examples", {}).get(m)
                if row is not dense and base is not None and len(base["num"]) == len(ex["num"]):
                    row["vs_dense"][key] = stats.paired_difference(base, ex, resamples, seed).to_dict()
        statuses = set(row["eval_status"].values()) | ({row["masks_status"]} if "masks_status" in row else set())
        row["status"] = statuses.pop() if len(statuses) == 1 else "partly reused"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        for key, value in r["metrics"].items():
            iv, d = r["intervals"].get(key, {}), r["vs_dense"].get(key, {})
            task = key.split("/")[0]
            w.writerow(
                {
                    "name": r["name"],
                    "method": r["method"],
                    "calib": r.get("calib") or "",
                    "target_sparsity": r["sparsity"],
                    "achieved_sparsity": r["achieved_sparsity"],
                    "metric": key,
                    "value": value,
                    "stderr": iv.get("stderr"),
                    "ci_low": iv.get("low"),
                    "ci_high": iv.get("high"),
                    "n": iv.get("n"),
                    "interval": iv.get("method"),
                    "diff_vs_dense": d.get("diff"),
                    "diff_low": d.get("low"),
                    "diff_high": d.get("high"),
                    "within_noise": None if not d or d["significant"] is None else not d["significant"],
                    "fingerprint": r["eval"][task].get("fingerprint"),
                    "status": r["eval_status"][key],
                }
            )
    return buf.getvalue()


def write_outputs(out: Path, results: dict, resamples: int = 1000, seed: int = 0) -> None:
    rows = results["runs"]
    annotate(rows, resamples, seed)
    files = {out / "results.json": strict_json(results), out / "results.csv": csv_text(rows)}  # refuses NaN first
    report.plot_metric_curves(rows, out / "figures" / "metrics_vs_sparsity.png")
    figures = sorted(p.name for p in (out / "figures").glob("head_scores_*.png")) + ["metrics_vs_sparsity.png"]
    if (out / "figures" / "recovery_loss.png").exists() and any("+recovery" in r["method"] for r in rows):
        figures.append("recovery_loss.png")
    for s in sorted({r["sparsity"] for r in rows if r["method"] != "dense"}):
        per_layer = {
            r["name"]: r["per_layer_sparsity"] for r in rows if r["sparsity"] == s and r.get("per_layer_sparsity")
        }
        if per_layer:
            name = f"layer_sparsity_s{sparsity_label(s)}.png"
            report.plot_layer_sparsity(
                per_layer, out / "figures" / name, title=f"per-layer sparsity at {sparsity_label(s)}"
            )
            figures.append(name)
    files[out / "report.md"] = report_markdown(results, figures)
    write_texts(files)  # one unit: all three complete on disk before the first replaces its old version


def report_markdown(results: dict, figures: list[str]) -> str:
    cfg, rows = results["config"], results["runs"]
    c, e = cfg["calibration"], cfg["evaluation"]
    reused = [r for r in rows if r["status"] != "computed"]
    other_code = [e.split(" ", 1)[1] for e in results["events"] if e.startswith("reused") and "(computed by" in e]
    foreign = (
        [
            f"Reused although other capjax code computed them (`capjax run --recompute` recomputes): "
            f"{'; '.join(other_code)}."
        ]
        if other_code
        else []
    )
    md = [
        f"# capjax run: {cfg['model']}",
        "",
        f"Calibration: {', '.join(c['tasks'])} (N={c['n']}, T={c['seq_len']}, K={c['subsets']}, {c['aggregate']}, "
        f"{c['method']}, {c['kind']} ablation, {c['metric']}); evaluation limit {e['limit']}; dtype {cfg['dtype']}; "
        f"seed {cfg['seed']}.",
        "Cells: value ± standard error (accuracies: binomial; perplexity and losses: bootstrap over windows or "
        'examples), then the change against dense; "n.s." marks a change whose 95% paired-bootstrap interval '
        'contains zero (inside the noise), "no test" one that was not tested (evaluation.bootstrap below '
        f"{stats.MIN_RESAMPLES} resamples, or one example). The sparsity column is the achieved sparsity of the "
        "prunable weights.",
        "",
        report.markdown_table(rows, relative_to=rows[0]),
        "",
        "Reused from earlier runs (same fingerprints): "
        + (", ".join(f"{r['name']} ({r['status']})" for r in reused) if reused else "nothing")
        + ".",
        *foreign,
        "",
        "Target sparsity: "
        + ", ".join(f"{r['name']} {sparsity_label(r['sparsity'])}" for r in rows if r["method"] != "dense"),
        "",
        *[f"![{f}](figures/{f})" for f in figures],
        "",
        f"Total time {results['seconds']:.0f} s on {describe(results['environment'])}. Every number, its 95% "
        "interval and its fingerprint are in results.json and results.csv.",
    ]
    return "\n".join(md) + "\n"
