"""Moved to `capjax.compressed`: the compressed-tensors checkpoint reader and writer sits below
`capjax.io`, which loads and saves such checkpoints. This path stays importable."""

from capjax.compressed import *  # noqa: F403
