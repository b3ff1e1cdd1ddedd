"""Training an organism from scratch with capjax's own optax step.

Legend: B examples, T their padded length (data.seq_len), V vocab, L layers, H query heads.

The step is `capjax.recover`'s (`capjax.recovery.train`): an organism is a dense model whose
"pruning masks" keep every weight, so `recover(model, init_params, dense_masks(params), data)`
is plain full training with AdamW on a warmup-cosine schedule, orbax checkpoints and bit-identical
resume, from one code path. Examples are packed into rows as recovery packs them
(`capjax.recovery.data`), and the rows of step k are a pure function of (seed, k).

Two kinds (`OrganismConfig.kind`):

    reasoning   word problems (`capjax.data.organism`, prompt "Question: ... Answer:", loss on the
                chain of thought, the answer and a closing </s>) mixed with WikiText-2 text chunks
                (every token in the loss; `capjax.organism.text`), word-level tokenizer
                (`capjax.organism.tokenizer`)
    induction   sequences of random tokens whose second half repeats the first
                (`capjax.organism.induction`): a model that learns to predict the repeat forms
                induction heads
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("reasoning", "induction")


class OrganismConfigError(ValueError):
    """An organism config field out of range or unknown."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128  # E
    num_layers: int = 4  # L
    num_heads: int = 4  # H
    num_kv_heads: int = 2  # K
    head_dim: int = 32  # D
    intermediate_size: int = 384  # F
    max_position_embeddings: int = 256


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_problems: int = 20000  # reasoning: word problems in the training set
    seq_len: int = 80  # T: padded length of a problem; text chunks have this many tokens
    text_words: int = 2000  # text words in the vocabulary besides the problems' words
    text_stride: int = 40  # text chunks start every text_stride tokens (overlapping when < seq_len)
    heldout_articles: int = 8  # WikiText-2 articles kept out of training for perplexity
    use_text: bool = True  # mix WikiText-2 in (skipped, with a message, when the file is absent)
    data_dir: str | None = None
    # induction
    vocab_size: int = 64  # V of the random-token organism
    segment_len: int = 16  # random tokens repeated once: rows of 2 segment_len + 1 tokens
    train_sequences: int = 4000


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    n: int = 500  # held-out problems
    batch_size: int = 100
    max_new_tokens: int = 48
    ppl_seq_len: int = 80


@dataclasses.dataclass(frozen=True)
class OrganismConfig:
    kind: str = "reasoning"
    seed: int = 0
    out: str = "capjax/organism/weights/reasoning"
    checkpoint_dir: str | None = None
    model: ModelShape = ModelShape()
    data: DataSettings = DataSettings()
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # capjax.recovery.RecoverySettings fields
    eval: EvalSettings = EvalSettings()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise OrganismConfigError(f"kind={self.kind!r}: use one of {', '.join(KINDS)}")
        m = self.model
        if m.num_heads % m.num_kv_heads:
            raise OrganismConfigError(
                f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"
            )
        if self.data.seq_len < 8 or self.data.seq_len > m.max_position_embeddings:
            raise OrganismConfigError(
                f"data.seq_len={self.data.seq_len}: need 8 .. model.max_position_embeddings "
                f"({m.max_position_embeddings})"
            )
        self.settings()  # RecoverySettings validates the train section

    def settings(self):
        """The train section as RecoverySettings (full training, no remat, lenient divergence check:
        a model from scratch starts at ln V)."""
        from capjax.recovery.settings import RecoverySettings, RecoverySettingsError

        base = {
            "mode": "full",
            "remat": False,
            "max_loss_ratio": 10.0,
            "seed": self.seed,
            "lr": 3e-3,
            "warmup_steps": 50,
            "final_lr_fraction": 0.05,
            "weight_decay": 0.01,
            "steps": 1000,
            "batch_size": 32,
            "checkpoint_every": 200,
        }
        try:
            return RecoverySettings.from_dict({**base, **self.train})
        except (RecoverySettingsError, ValueError) as e:
            raise OrganismConfigError(str(e).replace("recovery", "train", 1)) from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrganismConfig:
        d = dict(d or {})
        sections = {"model": ModelShape, "data": DataSettings, "eval": EvalSettings}
        _refuse_unknown("", d, {f.name for f in dataclasses.fields(cls)})
        for name, kind in sections.items():
            if name in d:
                _refuse_unknown(name + ".", d[name] or {}, {f.name for f in dataclasses.fields(kind)})
                d[name] = kind(**(d[name] or {}))
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> OrganismConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"organism config not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
        for k, v in (overrides or {}).items():
            head, _, tail = k.partition(".")
            if tail:
                d.setdefault(head, {})[tail] = v
            else:
                d[k] = v
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _refuse_unknown(prefix: str, d: dict, known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise OrganismConfigError(
            f"{prefix}{unknown[0]}: unknown organism config key; known: {', '.join(sorted(known))}"
        )


# ---------------------------------------------------------------------------- building blocks
def model_config(
    cfg: OrganismConfig,
    vocab_size: int,
    eos_id: int | None = None,
    pad_id: int | None = None,
    bos_id: int | None = None,
):
    """The Llama-layout ModelConfig (GQA, tied embeddings) of the organism."""
    from capjax.config import ModelConfig

    m = cfg.model
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=m.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def dense_masks(params):
    """Masks that keep every prunable weight: `recover` with them is plain full training."""
    from capjax.pruning.importance import PRUNABLE, get_path
    from capjax.pruning.prune import masks_from_flat

    return masks_from_flat(params, {p: np.ones(get_path(params, p).shape, bool) for p in PRUNABLE})


def problem_examples(tokenizer, n: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """n training problems as calibration batches build them (`build_calibration("organism")`:
    prompt, then the answer in the loss), with </s> appended to each answer (in the loss, so the
    model learns to stop). tokens, loss_mask, attention_mask [B, T]."""
    from capjax.data import build_calibration

    calib = build_calibration("organism", tokenizer, n=n, seq_len=seq_len, seed=seed, chat=False)
    if calib.n_truncated:
        raise OrganismConfigError(f"data.seq_len={seq_len} cuts {calib.n_truncated} problems: raise it")
    tokens, loss_mask, am = calib.tokens.copy(), calib.loss_mask.copy(), calib.attention_mask.copy()
    ends = am.sum(axis=1)  # [B]
    if int(ends.max()) >= seq_len:
        raise OrganismConfigError(f"data.seq_len={seq_len} leaves no room for </s>: raise it by one")
    rows = np.arange(len(tokens))
    tokens[rows, ends], loss_mask[rows, ends], am[rows, ends] = tokenizer.eos_token_id, 1.0, 1
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": am}


def text_chunks(tokenizer, text: str, seq_len: int, stride: int) -> dict[str, np.ndarray]:
    """Chunks of seq_len tokens starting every `stride` tokens, every token but the first in the loss."""
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    starts = np.arange(0, len(ids) - seq_len + 1, stride)
    tokens = ids[starts[:, None] + np.arange(seq_len)[None]]  # [B, T]
    loss_mask = np.ones(tokens.shape, np.float32)
    loss_mask[:, 0] = 0
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": np.ones(tokens.shape, np.int32)}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def reasoning_setup(cfg: OrganismConfig, log=print):
    """(tokenizer, training examples dict, held-out text or None)."""
    from capjax.organism.text import wikitext_parts
    from capjax.organism.tokenizer import build_tokenizer

    d = cfg.data
    parts = wikitext_parts(d.data_dir, d.heldout_articles) if d.use_text else None
    if d.use_text and parts is None:
        log(
            "organism: WikiText-2 (wikitext2/wiki.test.raw) not found in the data folder (data.data_dir, "
            "$CAPJAX_DATA, ../shared/data): training on word problems only, no perplexity"
        )
    train_text, heldout = parts if parts is not None else (None, None)
    tokenizer = build_tokenizer(train_text, d.text_words if train_text else 0)
    examples = [problem_examples(tokenizer, d.train_problems, d.seq_len, cfg.seed)]
    if train_text is not None:
        examples.append(text_chunks(tokenizer, train_text, d.seq_len, d.text_stride))
    return tokenizer, _concat(examples), heldout


# ---------------------------------------------------------------------------- training
def train(
    cfg: OrganismConfig, steps: int | None = None, progress: bool = True, log=print, callback=None
) -> dict[str, Any]:
    """Trains the organism; returns {"model", "params", "tokenizer", "history", "heldout_text",
    "seconds"}. `steps` overrides train.steps (the schedule follows it)."""
    from capjax.model import Decoder, init_params
    from capjax.recovery import recover

    t0 = time.perf_counter()
    if cfg.kind == "reasoning":
        tokenizer, examples, heldout = reasoning_setup(cfg, log)
    else:
        from capjax.organism.induction import induction_examples, induction_tokenizer

        tokenizer = induction_tokenizer(cfg.data.vocab_size)
        examples, heldout = (
            induction_examples(cfg.data.train_sequences, cfg.data.segment_len, cfg.data.vocab_size, cfg.seed),
            None,
        )
    config = model_config(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    model = Decoder(config)
    params = init_params(config, cfg.seed)
    settings = cfg.settings()
    if steps is not None:
        settings = settings.replace(steps=steps)
    log(
        f"organism ({cfg.kind}): {config.num_params():,} parameters, V={config.vocab_size}, "
        f"{len(examples['tokens'])} training examples, {settings.steps} steps of {settings.batch_size} rows"
    )
    params, history = recover(
        model,
        params,
        dense_masks(params),
        examples,
        settings=settings,
        checkpoint_dir=cfg.checkpoint_dir,
        progress=progress,
        callback=callback,
    )
    return {
        "model": model,
        "params": params,
        "tokenizer": tokenizer,
        "history": history,
        "heldout_text": heldout,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------- evaluation
def reasoning_accuracy(
    model, params, tokenizer, n: int = 500, batch_size: int = 100, max_new_tokens: int = 48, seed: int = 0
) -> dict[str, Any]:
    """Greedy exact match (strict: "The answer is N") on n held-out problems, through
    `capjax.evaluate` ("organism" task); also per step count. -> {"accuracy", "n", "by_steps",
    "answer_loss", "correct" [n] (0/1 per problem, for intervals and paired tests)}."""
    from capjax.data import eval_records
    from capjax.evaluate import evaluate

    out = evaluate(
        model,
        params,
        tokenizer,
        ["organism"],
        limit=n,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=False,
        log_samples=True,
        progress=False,
    )
    res, samples = out["results"]["organism"], out["samples"]["organism"]
    steps = {r["id"]: r["steps"] for r in eval_records("organism", n=n, seed=seed)}
    correct = [int(s["accuracy_strict"]) for s in samples]
    by_steps = {}
    for k in sorted(set(steps.values())):
        hits = [c for s, c in zip(samples, correct) if steps[s["id"]] == k]
        by_steps[str(k)] = {"accuracy": float(np.mean(hits)), "n": len(hits)}
    return {
        "accuracy": res["accuracy_strict"],
        "n": res["n"],
        "by_steps": by_steps,
        "answer_loss": res["answer_loss"],
        "correct": correct,
    }


def heldout_perplexity(model, params, tokenizer, text: str | None, seq_len: int = 80) -> dict[str, Any] | None:
    """Perplexity on the held-out WikiText-2 articles (`capjax.evaluate.perplexity`), None without text."""
    if text is None:
        return None
    from capjax.evaluate import perplexity

    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    return perplexity(model, params, ids, seq_len=seq_len, batch_size=32)


def save(result: dict[str, Any], cfg: OrganismConfig, metrics: dict[str, Any], out: str | Path | None = None) -> Path:
    """The HF folder (capjax.save_pretrained, with the tokenizer) plus organism.json (the config,
    the loss curve, the metrics)."""
    from capjax.io import save_pretrained

    folder = save_pretrained(result["model"], result["params"], out or cfg.out, tokenizer=result["tokenizer"])
    h = result["history"]
    record = {
        "config": cfg.to_dict(),
        "metrics": metrics,
        "seconds": result["seconds"],
        "loss": [round(x, 5) for x in h["loss"]],
        "train_seconds": h["seconds"],
    }
    (folder / "organism.json").write_text(json.dumps(record, indent=1) + "\n")
    return folder


def compare_weights(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Every tensor of two HF folders' model.safetensors compared bit for bit: {"identical": bool,
    "tensors": count, "differing": {name: max |a - b|}, "only_in_a" / "only_in_b": names}."""
    from safetensors.numpy import load_file

    files = [Path(x) / "model.safetensors" for x in (a, b)]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file; give a folder written by capjax.save_pretrained")
    ta, tb = (load_file(str(f)) for f in files)
    shared = sorted(set(ta) & set(tb))
    differing = {
        k: float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64))))
        if ta[k].shape == tb[k].shape
        else float("nan")
        for k in shared
        if ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype or ta[k].tobytes() != tb[k].tobytes()
    }
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    return {
        "identical": not (differing or only_a or only_b),
        "tensors": len(shared),
        "differing": differing,
        "only_in_a": only_a,
        "only_in_b": only_b,
    }
