"""Experiments: a typed run config, a content-keyed artifact store, the runner and its outputs.

    cfg = capjax.experiment.load_run_config("configs/smollm2_demo.yaml", ["calibration.n=24"])
    results = capjax.experiment.Experiment(cfg).run()

`config` and `store` import no jax (the CLI validates a config in a fraction of a second);
`runner` (Experiment) loads it when first used.
"""

from capjax.experiment.config import (
    CalibrationConfig,
    ConfigError,
    EvaluationConfig,
    PruningConfig,
    RunConfig,
    load_run_config,
    parse_overrides,
)

__all__ = [
    "CALIB_TASKS",
    "EVAL_TASKS",
    "CalibrationConfig",
    "ConfigError",
    "EvaluationConfig",
    "Experiment",
    "PruningConfig",
    "RunConfig",
    "load_run_config",
    "parse_overrides",
    "plan_runs",
]


def __getattr__(name: str):
    if name in ("CALIB_TASKS", "EVAL_TASKS"):  # the task registry's names, read when asked
        from capjax.experiment import config

        return getattr(config, name)
    if name in ("Experiment", "plan_runs"):
        from capjax.experiment import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'capjax.experiment' has no attribute {name!r}")
