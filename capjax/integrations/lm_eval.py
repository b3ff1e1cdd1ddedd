"""The lm-evaluation-harness model "capjax": the harness' requests on capjax's jitted paths.

    python -m capjax.integrations.lm_eval run --model capjax \\
        --model_args pretrained=results/pruned,masks=results/pruned/masks.npz --tasks arc_challenge

    import lm_eval, capjax.integrations.lm_eval as cl
    lm_eval.simple_evaluate(model=cl.CapjaxLM(model=model, params=pruned, tokenizer=tok), tasks=[...])

Importing this module registers the name "capjax" with the harness (`lm_eval.api.registry`);
the `lm_eval` console script itself does not import it, hence the `python -m` route above and
the `capjax-lm-eval` console script (`capjax.integrations.lm_eval_cli`).
Tokenization follows the harness' `HFLM` (same `tok_encode`, `_encode_pair`, prefix token,
left truncation and rolling windows), so scores match `--model hf` on the exported folder:

    loglikelihood           `capjax.evaluate.continuation_logprobs` (teacher-forced, bucketed)
    loglikelihood_rolling   the same over lm-eval's disjoint rolling windows
    generate_until          `capjax.evaluate.generate` (greedy, KV cache); sampling is refused
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # optional dependency: say how to get it
    raise ImportError(f"the lm-eval model needs lm-evaluation-harness: pip install capjax[lm-eval] ({e})") from e

DEFAULT_BATCH = 8
# What the harness itself adds to --model_args (create_from_arg_string's additional_config); any
# other key is a typo (mask= for masks=) that would otherwise evaluate the dense model silently.
HARNESS_KEYS = ("max_batch_size", "device")


def _batch_size(value: Any) -> int:
    """The harness passes ints, strings, or "auto"; capjax compiles per batch shape, so auto -> 8."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    try:
        b = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={value!r}: use a positive integer or 'auto'") from None
    if b < 1:
        raise ValueError(f"batch_size={b}: use a positive integer or 'auto'")
    return b


@register_model("capjax")
class CapjaxLM(TemplateLM):
    """An lm-eval `LM` over a capjax model.

    From the command line: pretrained= (HF folder, .gguf, hub id or smollm2-135m-instruct),
    optional masks= (a masks.npz applied to those weights), dtype= (float32 | bfloat16),
    batch_size=, max_length=, max_gen_toks=, add_bos_token=. From Python: model=, params=
    (e.g. an in-memory pruned tree) and tokenizer= (object or source) instead of pretrained.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        masks: str | None = None,
        dtype: str = "float32",
        batch_size: Any = DEFAULT_BATCH,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | str | None = None,
        model: Any = None,
        params: dict | None = None,
        tokenizer: Any = None,
        **harness_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(harness_kwargs) - set(HARNESS_KEYS))
        if unknown:
            known = ("pretrained", "masks", "dtype", "batch_size", "max_length", "max_gen_toks", "add_bos_token")
            raise ValueError(
                f"model_args: unknown key(s) {', '.join(unknown)}; the capjax model takes "
                f"{', '.join(known)} (from Python also model, params, tokenizer)"
            )
        from capjax.io import load_pretrained, load_tokenizer
        from capjax.pruning.prune import apply_masks, masks_from_flat, read_masks_npz

        flat = read_masks_npz(masks) if masks else None  # a bad masks file is said before the model loads
        if model is None:
            if pretrained is None:
                raise ValueError(
                    "model_args needs pretrained=<HF folder | .gguf | hub id | smollm2-135m-instruct> "
                    "(or, from Python, model=, params=, tokenizer=)"
                )
            model, params = load_pretrained(pretrained, dtype=dtype)
        elif params is None:
            raise ValueError("model= needs params= too (the capjax params tree)")
        if flat is not None:
            params = apply_masks(params, masks_from_flat(params, flat))
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer or pretrained
            if source is None:
                raise ValueError("pass tokenizer= (a transformers tokenizer or its source) with model=")
            tokenizer = load_tokenizer(source)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() == "true"
        self.add_bos_token = add_bos_token

    # ------------------------------------------------------------------ tokenization (as HFLM)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "capjax").replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template as text (for --apply_chat_template), as HFLM."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ------------------------------------------------------------------ scoring
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), cont is greedy) per (ctx, cont), as HFLM: a row holds at most
        max_length + 1 tokens (left-truncated; the last one is a target only, so a row of
        max_position_embeddings + 1 is fine: RoPE has no position table). Longest first, so
        batches share a length bucket (`bucket_length`) and compile once per (B, bucket)."""
        from capjax.evaluate import bucket_length, token_logprobs
        from capjax.evaluate.generate import batches

        rows = []
        for ctx, cont in pairs:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens: need 1 to max_length={self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            rows.append((whole, len(whole) - len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        B = self.batch_size
        for chunk in batches(order, B, "loglikelihood", not disable_tqdm):
            T = bucket_length(max(len(rows[i][0]) for i in chunk))
            tokens = np.zeros((B, T), np.int32)
            mask = np.zeros((B, T), np.int32)
            for r in range(B):  # the last batch is padded with copies of its first row
                s = rows[chunk[r] if r < len(chunk) else chunk[0]][0]
                tokens[r, : len(s)] = s
                mask[r, : len(s)] = 1
            lp, greedy = token_logprobs(self.model, self.params, tokens, mask)
            for r, i in enumerate(chunk):
                s, n_ctx = rows[i]
                out[i] = (float(lp[r, n_ctx : len(s)].astype(np.float64).sum()), bool(greedy[r, n_ctx : len(s)].all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), r in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(w)
                owner.append(i)
        scores = self._score(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

        from capjax.evaluate import generate

        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kw: dict[str, Any] = dict(gen_kwargs or {})
            if kw.get("do_sample") and float(kw.get("temperature", 1.0)) > 0:
                raise ValueError(
                    f"generation_kwargs do_sample=True, temperature={kw.get('temperature', 1.0)}: "
                    "capjax decodes greedily; set do_sample: false (or temperature: 0)"
                )
            until = tuple(handle_stop_sequences(kw.get("until"), eos=eos))
            n = int(kw.get("max_gen_toks", kw.get("max_new_tokens", self.max_gen_toks)))
            if n >= self.max_length:
                raise ValueError(f"max_gen_toks={n} must be below max_length={self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - n)
            settings.append((ids, until))
            groups.setdefault((until, n), []).append(i)
        out = [""] * len(requests)
        for (until, n), members in groups.items():
            members = sorted(members, key=lambda i: -len(settings[i][0]))
            new = generate(
                self.model,
                self.params,
                [settings[i][0] for i in members],
                n,
                stop=list(until),
                tokenizer=self.tokenizer,
                batch_size=self.batch_size,
                progress=not disable_tqdm,
            )
            for i, toks in zip(members, new):
                text = postprocess_generated_text(
                    self.tokenizer.decode(toks, skip_special_tokens=True), list(until), None
                )
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv: list[str] | None = None) -> None:
    """The harness' command line with "capjax" registered: python -m capjax.integrations.lm_eval run ..."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from capjax.errors import expected_error, one_line

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except KeyboardInterrupt:
        print("capjax-lm-eval: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # bad model_args, paths, masks: one line and status 2, as the capjax CLI
        if not expected_error(e) or os.environ.get("CAPJAX_DEBUG") == "1":
            raise
        print(f"capjax-lm-eval: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
