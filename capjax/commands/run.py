"""`capjax run CONFIG [key=value ...]`: the whole experiment from one config."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="score, prune with every method and sparsity, evaluate, report")
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. calibration.n=16 evaluation.limit.wikitext2=8")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="reuse nothing from the results folder: compute every artifact again and overwrite it",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from capjax.experiment import load_run_config

    cfg = load_run_config(args.config, args.overrides)  # every field checked before the model loads

    from capjax.experiment import Experiment
    from capjax.report import markdown_table

    results = Experiment(cfg, recompute=args.recompute).run()
    from capjax.distributed import is_writer

    if not is_writer():
        return 0
    print()
    print(markdown_table(results["runs"], relative_to=results["runs"][0]))
    print(
        f"\nreport: {cfg.out}/report.md (figures in {cfg.out}/figures, numbers with intervals in "
        f"{cfg.out}/results.json and results.csv)"
    )
    return 0
