"""Organisms: small models trained from scratch here, whose skills and circuits are known in advance.

    reasoning   a Llama-layout decoder that solves 2-4 step word problems with written-out
                arithmetic (`capjax.data.organism`) and models WikiText-2 text: a model that can
                lose reasoning under pruning
    induction   a decoder trained on repeated random tokens: its induction and previous-token
                heads are the planted circuit that head scores are checked against

See `train` (the config, training with capjax.recover's step, evaluation), `tokenizer`, `text`,
`induction`, and docs/organism.md.
"""
