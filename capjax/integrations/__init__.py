"""Bridges to the tools users already have: an lm-evaluation-harness model
(`capjax.integrations.lm_eval`), which imports its optional dependency only when used. The
compressed-tensors sparse format that vLLM reads is `capjax.compressed` (below `capjax.io`,
which reads and writes it); `capjax.integrations.compressed` still names it."""
