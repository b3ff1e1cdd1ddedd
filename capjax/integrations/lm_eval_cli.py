"""`capjax-lm-eval`: the lm-evaluation-harness command line, with the model "capjax" registered.

    capjax-lm-eval run --model capjax --model_args pretrained=SRC,masks=SRC/masks.npz --tasks arc_challenge

Every argument is the harness' own (`lm_eval.__main__.cli_evaluate`). The plain `lm_eval --model
capjax` cannot find the model with lm-eval 0.4.13: the harness registers only the names of its own
`lm_eval/models/__init__.py` MODEL_MAPPING (`_register_all_models`), and `lm_eval/api/registry.py`
`get_model` looks names up in that registry alone; nothing reads installed packages' entry points,
so a model registers only by being imported, which this script does first.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry: imports capjax's harness model, then runs the harness CLI on sys.argv."""
    try:
        from capjax.integrations.lm_eval import main as harness_main
    except ImportError as e:  # lm-eval is an optional extra: one line, not a traceback
        print(f"capjax-lm-eval: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    harness_main()


if __name__ == "__main__":
    main()
