"""capjax's own tasks: one module per task, each one `Task` (capjax.data.task) and one
`register_task` call, as a user's plugin would be (docs/adding_a_task.md). Importing this package
imports every module in it, in name order, so a new built-in task is one new file here.

    task               mode           calibration   evaluation   data
    arc_challenge      loglikelihood  train         test         arc_challenge/
    arc_challenge_cot  generation     -             test         arc_challenge/ (ARC's records, CoT answers)
    gsm8k              generation     train         test         gsm8k/
    organism           generation     "train"       "eval"       generated (disjoint by construction)
    strategyqa         generation     train         dev          strategyqa/
    synthetic          generation     "calib"       "eval"       generated (disjoint by construction)
    wikitext2          perplexity     -             test         wikitext2/wiki.test.raw

The evaluation code they name ("module:function") is imported only when a task runs.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
