"""`recover`: masked fine-tuning of a pruned model (full, or sparse LoRA) with optax, keeping the
sparsity exact.

Legend: M micro-batches per step, b rows per micro-batch, S packed columns, Q = b (S - 1) loss
positions, L layers, E hidden, V vocab.

One step is one jitted pure function (state, frozen, masks, batch [M, b, S]) -> (state, loss,
grad norm). The loss is the mean NLL over the step's loss tokens (answer tokens, or every text
token): the M micro-batches' summed NLL gradients are accumulated in a scan and divided by the
step's loss-token count, which equals the gradient of the whole batch at once.

Exact sparsity, full mode: the gradient is multiplied by the mask (as a PyTorch `grad * mask`
loop does), and after the optax update the pruned entries are set to zero again (a projection,
so any optimizer, e.g. with weight decay or momentum from a custom chain, cannot move them). The
trainable copy is float32 (master weights and float32 AdamW moments), the matmuls run in the
model's compute dtype, and the result is cast back to each leaf's input dtype (zero stays zero).
Sparse LoRA: the effective kernels are mask * (W + scale a b) (`capjax.recovery.lora`) in every
forward and in the final merge.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax import sharding
from capjax.artifacts import Digest
from capjax.model import Decoder, layer_context, token_nll, unembed
from capjax.pruning.importance import PRUNABLE, get_path
from capjax.pruning.prune import apply_masks
from capjax.recovery.checkpoint import RecoveryCheckpoints
from capjax.recovery.data import pack_for_training, step_batch
from capjax.recovery.lora import check_rank, init_lora, merge_layer, merge_lora
from capjax.recovery.settings import DISTIL_FIELDS, DISTIL_POSITIONS, RecoverySettings, memory_bytes
from capjax.scan import scan_layers

Params = dict[str, Any]
LOSS_ROWS = 512  # loss positions per LM-head chunk: bounds the float32 [LOSS_ROWS, V] logits


class RecoveryDivergedError(ValueError):
    """The loss became NaN / infinite or grew past max_loss_ratio times the first loss."""


class MaskTreeError(ValueError):
    """Masks that do not match the params' tree."""


# ---------------------------------------------------------------------------- checks
def check_masks(params: Params, masks: Params) -> None:
    """Masks must have a bool-like array shaped like each of the seven kernels (None elsewhere)."""
    for p in PRUNABLE:
        try:
            m = get_path(masks, p)
        except (KeyError, TypeError):
            raise MaskTreeError(
                f"masks have no entry {p}: pass the masks returned by capjax.prune for these "
                "params (or capjax.pruning.prune.masks_from_flat(params, masks.npz))"
            ) from None
        w = get_path(params, p)
        if m is None or tuple(np.shape(m)) != tuple(w.shape):
            raise MaskTreeError(
                f"mask {p} has shape {None if m is None else list(np.shape(m))}, the kernel has "
                f"{list(w.shape)}: masks must come from pruning these params"
            )
    extra: Any = jax.tree_util.tree_structure(params, is_leaf=lambda x: x is None)
    got: Any = jax.tree_util.tree_structure(masks, is_leaf=lambda x: x is None)
    if extra.num_leaves != got.num_leaves:
        raise MaskTreeError(
            f"masks have {got.num_leaves} leaves, the params {extra.num_leaves}: masks must have "
            "the params' tree (None at the unpruned leaves)"
        )


def resolve_mode(model: Decoder, params: Params, settings: RecoverySettings) -> str:
    """settings.mode, with "auto" -> "full" when its memory estimate fits the available memory."""
    if settings.mode != "auto":
        return settings.mode
    from capjax.memory import available_bytes

    dtype = jax.tree.leaves(params)[0].dtype
    return "full" if memory_bytes(model.config, dtype, "full") <= available_bytes() else "lora"


def build_optimizer(settings: RecoverySettings) -> optax.GradientTransformation:
    """Global-norm clipping (when set), then AdamW on the warmup-cosine schedule of `settings`."""
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip) if settings.grad_clip else optax.identity(),
        optax.adamw(lr_schedule(settings), settings.b1, settings.b2, settings.eps, weight_decay=settings.weight_decay),
    )


def lr_schedule(settings: RecoverySettings) -> optax.Schedule:
    warmup = min(settings.warmup_steps, settings.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, warmup, settings.steps, settings.lr * settings.final_lr_fraction
    )


# ---------------------------------------------------------------------------- loss
@dataclasses.dataclass(frozen=True)
class Distillation:
    """Logit distillation from a teacher (static part; its params travel as a step argument).

    loss = mean over the KL positions of temperature^2 KL(softmax(teacher / T) || softmax(student / T))
         + ce_weight * mean over the loss positions of the target's NLL,
    each mean over the whole step (all micro-batches). positions: "all" (default) = every position
    that predicts a real token of its own example (the question as well as the answer; no padding,
    no position across two packed examples); "loss" = the loss positions only (the answer tokens of
    a calibration task; every token of text data)."""

    teacher: Decoder
    temperature: float = 1.0
    ce_weight: float = 0.0
    positions: str = "all"


def distil_mask(batch: dict[str, Any], distil: Distillation) -> Any:
    """[..., S] float32: 1 where token s is a KL target (predicted from position s - 1), as loss_mask."""
    if distil.positions == "loss":
        return batch["loss_mask"]
    seg = batch["segment_ids"]
    same = (seg[..., 1:] == seg[..., :-1]) & (seg[..., 1:] > 0)
    xp = jnp if isinstance(seg, jax.Array) else np
    return xp.concatenate([xp.zeros_like(same[..., :1]), same], axis=-1).astype(xp.float32)


def distil_norm(batch: dict[str, Any], distil: Distillation) -> tuple[Any, Any]:
    """(KL positions, loss positions) of a whole step's batch: the two means' denominators (>= 1)."""
    xp = jnp if isinstance(batch["tokens"], jax.Array) else np
    k = xp.sum(batch.get("distil_mask", distil_mask(batch, distil))[..., 1:])
    n = xp.sum(batch["loss_mask"][..., 1:])
    return xp.maximum(k, 1.0), xp.maximum(n, 1.0)


def _hidden(model: Decoder, params: Params, batch: dict[str, jax.Array], layers: Any, layer_fn, remat: bool):
    """Final hidden states [b, S, E] of a micro-batch; layers: the scanned layer tree."""
    x, ctx = layer_context(
        model, params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )

    return scan_layers(model, params, x, ctx, layers=(layers, layer_fn), remat=remat)


def distil_position_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, target: jax.Array, distil: Distillation
) -> tuple[jax.Array, jax.Array]:
    """(T^2 KL(p_teacher^T || p_student^T), NLL of the target), each per position [Q], from logits [Q, V]
    (the NLL is zeros when ce_weight is 0: not computed)."""
    t = distil.temperature
    log_ps = jax.nn.log_softmax(student_logits / t, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits / t, axis=-1)
    kl = (t * t) * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    if not distil.ce_weight:
        return kl, jnp.zeros_like(kl)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(student_logits, axis=-1), target[:, None], axis=-1)[:, 0]
    return kl, nll


def _nll_sum(
    model: Decoder,
    params: Params,
    batch: dict[str, jax.Array],
    layers: Any,
    layer_fn,
    remat: bool,
    distil: Distillation | None = None,
    teacher: Params | None = None,
    norm: tuple[Any, Any] | None = None,
):
    """(summed loss, count) of one micro-batch [b, S]; layers: the scanned layer tree. The loss is
    the NLL summed over the loss tokens and the count their number; or with `distil` the
    distillation loss against the teacher's logits (computed here, on the fly, from `teacher`
    params that get no gradient), already divided by the step's `norm` = (KL positions, loss
    positions), and the count this micro-batch's share of the KL positions (they add up to 1)."""
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    x = _hidden(model, params, batch, layers, layer_fn, remat)
    h = x[:, :-1].reshape(-1, x.shape[-1])  # position s predicts token s + 1
    target, w = tokens[:, 1:].reshape(-1), loss_mask[:, 1:].reshape(-1)
    Q = h.shape[0]
    C = min(LOSS_ROWS, Q)
    pad = -Q % C
    h, target, w = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(target, (0, pad)), jnp.pad(w, (0, pad))
    xs: tuple[jax.Array, ...] = (h.reshape(-1, C, h.shape[-1]), target.reshape(-1, C), w.reshape(-1, C))
    if distil is None:

        @jax.checkpoint
        def chunk(total, xs):
            hc, tc, wc = xs
            return total + jnp.sum(token_nll(model, params, hc, tc) * wc), None

        total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), xs)
        return total, jnp.sum(w)
    assert teacher is not None and norm is not None  # distil is set only with a teacher
    n_kl, n_loss = norm
    tp = jax.lax.stop_gradient(teacher)
    xt = _hidden(distil.teacher, tp, batch, tp["layers"], lambda lp: lp, remat)
    ht = jnp.pad(xt[:, :-1].reshape(-1, xt.shape[-1]), ((0, pad), (0, 0)))
    wk = jnp.pad(batch.get("distil_mask", distil_mask(batch, distil))[:, 1:].reshape(-1), (0, pad))
    xs = (*xs, ht.reshape(-1, C, ht.shape[-1]), wk.reshape(-1, C))

    @jax.checkpoint
    def chunk_distil(total, xs):
        hc, tc, wc, htc, wkc = xs
        zs, zt = unembed(model, params, hc), unembed(distil.teacher, tp, htc)  # [C, V] float32
        kl, nll = distil_position_loss(zs, zt, tc, distil)
        return total + jnp.sum(kl * wkc) / n_kl + distil.ce_weight * jnp.sum(nll * wc) / n_loss, None

    total, _ = jax.lax.scan(chunk_distil, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(wk) / n_kl


def _micro_loss(
    model: Decoder,
    mode: str,
    scale: float,
    remat: bool,
    distil: Distillation | None,
    trainable,
    frozen,
    masks,
    mb,
    teacher=None,
    norm=None,
):
    """(summed loss, count) of micro-batch mb [b, S] (`_nll_sum`); full: trainable are the params;
    lora: trainable are the adapters over the frozen params; distil: against the teacher's params."""
    if mode == "full":
        return _nll_sum(model, trainable, mb, trainable["layers"], lambda lp: lp, remat, distil, teacher, norm)
    masks_l = {p: get_path(masks, p) for p in trainable}
    return _nll_sum(
        model,
        frozen,
        mb,
        (frozen["layers"], trainable, masks_l),
        lambda t: merge_layer(t[0], t[1], t[2], scale),
        remat,
        distil,
        teacher,
        norm,
    )


def batch_loss(
    model: Decoder,
    params: Params,
    data: Any,
    adapters: dict | None = None,
    masks: Params | None = None,
    scale: float = 1.0,
    rows_per_call: int = 8,
    distil: Distillation | None = None,
    teacher: Params | None = None,
) -> float:
    """Mean NLL over the loss tokens of `data` (as `recover` trains on it: packed, answer tokens or
    every text token), for params, or for params with LoRA adapters under masks (the training
    forward); with `distil` and the teacher's params, the distillation loss instead. Rows go
    through in calls of `rows_per_call`."""
    data = pack_for_training(data)
    mode = "full" if adapters is None else "lora"
    fn = _loss_fn(model, mode, float(scale), distil)
    keys = ("tokens", "segment_ids", "positions", "loss_mask")
    norm = None if distil is None else distil_norm({k: getattr(data, k) for k in keys}, distil)
    total = count = 0.0
    for i in range(0, len(data), rows_per_call):
        idx = np.arange(i, i + rows_per_call) % len(data)  # fixed shape; repeats are weighted out
        w = (np.arange(i, i + rows_per_call) < len(data)).astype(np.float32)
        mb = {k: jnp.asarray(getattr(data, k)[idx]) for k in keys}
        if distil is not None:
            mb["distil_mask"] = distil_mask(mb, distil) * jnp.asarray(w)[:, None]
        mb["loss_mask"] = mb["loss_mask"] * jnp.asarray(w)[:, None]
        t, c = fn(params if mode == "full" else adapters, None if mode == "full" else params, masks, mb, teacher, norm)
        total, count = total + float(t), count + float(c)
    return total / count


@lru_cache(maxsize=16)
def _loss_fn(model, mode, scale, distil=None):
    return jax.jit(partial(_micro_loss, model, mode, scale, False, distil))


OPTIMIZER_FIELDS = ("steps", "lr", "warmup_steps", "final_lr_fraction", "weight_decay", "b1", "b2", "eps", "grad_clip")


def _optimizer_key(settings: RecoverySettings) -> tuple:
    return tuple(getattr(settings, f) for f in OPTIMIZER_FIELDS)


@lru_cache(maxsize=16)
def _default_optimizer(key: tuple) -> tuple[optax.GradientTransformation, Any]:
    """(the default optimizer, its jitted init) for settings with these OPTIMIZER_FIELDS."""
    tx = build_optimizer(RecoverySettings(**dict(zip(OPTIMIZER_FIELDS, key))))
    return tx, jax.jit(tx.init)


@lru_cache(maxsize=16)
def _cached_step(model: Decoder, mode: str, scale: float, remat: bool, key: tuple, distil: Distillation | None = None):
    """The compiled step for the default optimizer: one compile per (model, mode, optimizer settings)."""
    return _step_fn(model, mode, scale, remat, _default_optimizer(key)[0], distil)


def _step_fn(
    model: Decoder,
    mode: str,
    scale: float,
    remat: bool,
    optimizer: optax.GradientTransformation,
    distil: Distillation | None = None,
):
    # The gradient is taken with respect to the trainable tree only: the teacher is an input.
    grad_fn = jax.value_and_grad(partial(_micro_loss, model, mode, scale, remat, distil), has_aux=True)

    def step(state, frozen, masks, batch, teacher=None):
        trainable = state["trainable"]
        norm = None if distil is None else distil_norm(batch, distil)  # the whole step's position counts

        def acc(carry, mb):
            (total, count), g = grad_fn(trainable, frozen, masks, mb, teacher, norm)
            s, c, gs = carry
            return (s + total, c + count, jax.tree.map(jnp.add, gs, g)), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (total, count, grads), _ = jax.lax.scan(
            acc, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros), batch
        )
        count = jnp.maximum(count, 1.0)
        loss = total / count
        grads = jax.tree.map(lambda g: g / count, grads)
        if mode == "full":
            grads = apply_masks(grads, masks)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        new = optax.apply_updates(trainable, updates)
        if mode == "full":
            new = apply_masks(new, masks)
        losses = state["losses"].at[state["step"]].set(loss)
        norms = jnp.stack([optax.tree.norm(grads), optax.tree.norm(updates)])
        return (
            {
                "trainable": new,
                "opt_state": opt_state,
                "step": state["step"] + 1,
                "rng": state["rng"],
                "losses": losses,
            },
            loss,
            norms,
        )

    return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------------------- run
def _fingerprint(
    model,
    params,
    masks,
    data,
    settings: RecoverySettings,
    mode: str,
    optimizer,
    distil: Distillation | None = None,
    teacher: Params | None = None,
) -> str:
    kept = {
        k: v for k, v in settings.to_dict().items() if k not in ("checkpoint_every", "max_loss_ratio", *DISTIL_FIELDS)
    }  # distillation: from `distil`
    d = Digest().text(
        json.dumps([repr(model.config), str(model.dtype), mode, kept, optimizer is None], sort_keys=True, default=str)
    )
    if distil is not None:
        d.text(repr((distil.teacher.config, distil.temperature, distil.ce_weight, distil.positions)))
    d.raw(Digest().raw(data.fingerprint()).digest())
    for leaf in jax.tree.leaves(params) + [m for m in jax.tree.leaves(masks)] + jax.tree.leaves(teacher):
        f = jnp.asarray(leaf).astype(jnp.float32)
        d.array(jnp.stack([jnp.sum(f), jnp.sum(jnp.abs(f))]), layout=False)
    return d.hex(16)


def recover(
    model: Decoder,
    params: Params,
    masks: Params,
    data: Any,
    steps: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    *,
    settings: RecoverySettings | None = None,
    checkpoint_dir: str | Path | None = None,
    mesh: Any = None,
    progress: bool = True,
    callback: Callable[[int, Any], None] | None = None,
    teacher: tuple[Decoder, Params] | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    distil_positions: str = "all",
    **overrides: Any,
) -> tuple[Params, dict[str, Any]]:
    """Fine-tunes a pruned model; returns (params, history). Pruned entries are exactly zero in
    the result (and after every step of full fine-tuning).

    params: the plain nested dict (`capjax.model`); masks: its tree with a bool array (True = kept)
        at each of the seven kernels, None elsewhere (as `capjax.prune` returns).
    data: a CalibrationBatch (its answer tokens in the loss), a dict with tokens and loss_mask
        [N, T] (and attention_mask), or a `RecoveryData` (`capjax.recovery.build_recovery_data`).
    steps: optimizer steps (default settings.steps). optimizer: any optax transformation (default
        `build_optimizer(settings)`: clipping + AdamW on a warmup-cosine schedule).
    settings: `RecoverySettings`; keyword `overrides` replace its fields (lr=, mode=, rank=, ...).
    checkpoint_dir: orbax checkpoints every settings.checkpoint_every steps; a rerun with the same
        arguments resumes from the newest one and ends bit-identical to an uninterrupted run.
    mesh: a jax Mesh: params, masks and optimizer state sharded by `capjax.sharding.DEFAULT_RULES`,
        each micro-batch's rows split over "data".
    history: {"loss" [steps] (mean loss-token NLL before each step's update), "lr" [steps],
        "mode", "steps", "resumed_from", "tokens_per_s", "seconds", "checkpoint"}.
    callback(step, trainable): called after every step (before its checkpoint) with the step count and
        the trainable tree (full: the float32 params; lora: the adapters).
    teacher: (model, params) of a teacher with the same vocabulary (the dense model, for a structured
        one): the loss becomes logit distillation, temperature^2 KL(teacher || student) at
        `temperature` averaged over every real position (`distil_positions="all"`: each position
        that predicts a real token of its own example, question and answer alike; "loss": the loss
        positions only), plus ce_weight times the mean NLL over the loss positions; the teacher's
        logits are computed in each step (never stored) and its params are an input of the step,
        never updated.
    masks: None means nothing is pruned (a shrunken structured model: every weight trains).
    Raises RecoveryDivergedError (keeping the last good checkpoint) on a NaN / infinite loss,
    gradient or update, or a loss above settings.max_loss_ratio times the first one.
    """
    settings = (settings or RecoverySettings()).replace(**overrides, **({"steps": steps} if steps is not None else {}))
    distil, teacher_params = _check_teacher(model, teacher, temperature, ce_weight, distil_positions)
    if masks is None:
        from capjax.pruning.prune import masks_from_flat

        masks = masks_from_flat(params, {p: np.ones(get_path(params, p).shape, bool) for p in PRUNABLE})
    check_masks(params, masks)
    mode = resolve_mode(model, params, settings)
    if mode == "lora":
        check_rank(params, settings.rank)
    data = pack_for_training(data)
    if settings.compute_dtype is not None:
        model = Decoder(model.config, dtype=jnp.dtype(settings.compute_dtype))
    masks = jax.tree.map(lambda m: None if m is None else jnp.asarray(m, bool), masks, is_leaf=lambda x: x is None)
    dtypes = jax.tree.map(lambda a: a.dtype, params)
    params = apply_masks(params, masks)
    if mesh is not None:
        params, masks = sharding.shard_params(params, mesh), sharding.shard_params(masks, mesh)
        teacher_params = None if teacher_params is None else sharding.shard_params(teacher_params, mesh)
    tx, tx_init = (
        (optimizer, jax.jit(optimizer.init)) if optimizer is not None else _default_optimizer(_optimizer_key(settings))
    )
    rng = jax.random.PRNGKey(settings.seed)
    if mode == "full":
        # A copy: the step donates its state, and astype of a float32 array would be the caller's buffer.
        trainable, frozen = jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), params), None
    else:
        trainable, frozen = init_lora(params, settings.rank, jax.random.fold_in(rng, 1)), params
        if mesh is not None:
            trainable = jax.device_put(trainable, sharding.replicated(mesh))
    state = {
        "trainable": trainable,
        "opt_state": tx_init(trainable),
        "step": jnp.zeros((), jnp.int32),
        "rng": rng,
        "losses": jnp.zeros((settings.steps,), jnp.float32),
    }
    store = None
    start = 0
    if checkpoint_dir is not None:
        store = RecoveryCheckpoints(
            checkpoint_dir, _fingerprint(model, params, masks, data, settings, mode, optimizer, distil, teacher_params)
        )
        restored = store.restore(state)
        if restored is not None:
            start, state = restored
    scale = settings.alpha / settings.rank
    step_fn = (
        _cached_step(model, mode, scale, settings.remat, _optimizer_key(settings), distil)
        if optimizer is None
        else _step_fn(model, mode, scale, settings.remat, tx, distil)
    )
    put = (lambda b: b) if mesh is None else (lambda b: sharding.shard_batch(b, mesh, axis=1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start, desc=f"recovery ({mode})", unit="step")
    first = float(state["losses"][0]) if start else None
    tokens_done, t0, t_first = 0, None, time.perf_counter()
    try:
        for s in range(start, settings.steps):
            batch = step_batch(data, state["rng"], s, settings.batch_size, settings.grad_accum)
            n_tok = int((batch["segment_ids"] > 0).sum())
            new_state, loss, norms = step_fn(
                state, frozen, masks, put(jax.tree.map(jnp.asarray, batch)), teacher_params
            )
            loss, (gnorm, unorm) = float(loss), np.asarray(norms).tolist()
            first = loss if first is None else first
            finite = math.isfinite(loss) and math.isfinite(gnorm) and math.isfinite(unorm)
            if not finite or loss > settings.max_loss_ratio * first:
                last = store.latest() if store else None
                why = (
                    "a NaN / infinite loss, gradient or update"
                    if not finite
                    else f"the loss exceeds {settings.max_loss_ratio:g} x the first step's {first:.4f}"
                )
                raise RecoveryDivergedError(
                    f"recovery stopped at step {s + 1}: loss {loss:.4g}, gradient norm {gnorm:.4g} ({why}); "
                    + (f"last good checkpoint: {last}" if last else "no checkpoint (pass checkpoint_dir)")
                    + "; lower recovery.lr or raise warmup_steps"
                )
            state = new_state
            if t0 is None:  # the first step includes compilation
                t0 = time.perf_counter()
            else:
                tokens_done += n_tok
            if callback is not None:
                callback(s + 1, state["trainable"])
            if store is not None and ((s + 1) % settings.checkpoint_every == 0 or s + 1 == settings.steps):
                store.save(s + 1, state)
            if bar is not None:
                rate = tokens_done / max(time.perf_counter() - t0, 1e-9) if tokens_done else 0.0
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if store is not None:
            store.close()
    elapsed = time.perf_counter() - (t0 or t_first)
    if mode == "full":
        out = apply_masks(jax.tree.map(lambda a, d: a.astype(d), state["trainable"], dtypes), masks)
    else:
        assert frozen is not None  # lora keeps the frozen params
        out = merge_lora(frozen, state["trainable"], masks, settings.alpha / settings.rank)
    schedule = lr_schedule(settings)
    history = {
        "loss": np.asarray(state["losses"]).tolist(),
        "lr": [float(schedule(i)) for i in range(settings.steps)] if optimizer is None else None,
        "mode": mode,
        "steps": settings.steps,
        "resumed_from": start,
        "tokens_per_s": tokens_done / elapsed if tokens_done else None,
        "seconds": elapsed,
        "checkpoint": str(store.latest()) if store and store.latest() else None,
        "settings": dataclasses.asdict(settings),
    }
    if distil is not None:
        history["distil"] = {
            "temperature": distil.temperature,
            "ce_weight": distil.ce_weight,
            "positions": distil.positions,
        }
    return out, history


def _check_teacher(
    model: Decoder, teacher: Any, temperature: float, ce_weight: float, positions: str = "all"
) -> tuple[Distillation | None, Params | None]:
    """(Distillation, teacher params) from recover's teacher=(model, params), or one-line refusals."""
    if teacher is None:
        return None, None
    if not (isinstance(teacher, tuple) and len(teacher) == 2 and isinstance(teacher[0], Decoder)):
        raise ValueError("teacher must be a (model, params) pair as capjax.load_pretrained returns")
    t_model, t_params = teacher
    if t_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"teacher vocab_size {t_model.config.vocab_size} != student {model.config.vocab_size}: "
            "distillation compares logits over one vocabulary"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: expected a positive number")
    if not (math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"ce_weight={ce_weight!r}: expected a number >= 0")
    if positions not in DISTIL_POSITIONS:
        raise ValueError(f"distil_positions={positions!r}: use one of {', '.join(DISTIL_POSITIONS)}")
    return Distillation(t_model, float(temperature), float(ce_weight), positions), t_params
