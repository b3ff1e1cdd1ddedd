"""Bridges to the tools users already have: the compressed-tensors sparse format that vLLM
reads (`capjax.integrations.compressed`) and an lm-evaluation-harness model
(`capjax.integrations.lm_eval`). Each imports its optional dependency only when used."""
