"""The oracle for capjax's named sites: PyTorch forward hooks on a transformers model that read (and,
where transformers computes the value as a module's input or output, replace) each site's value.

    logits, sites = hf_run(hf, tokens, am)                       # sites[name][l]: numpy, capjax's layout
    logits, _ = hf_run(hf, tokens, am, edit=lambda name, l, v: ...)   # v: torch, capjax's layout

Editable sites: resid.pre, attn.q / k / v (not Phi-3's fused qkv), attn.z, attn.out, mlp.hidden,
mlp.out, resid.post. attn.pattern (eager attention's weights), resid.mid, attn.in (q_proj's input) and
mlp.in (the MLP's input) are read only.
"""

from __future__ import annotations

import numpy as np
import torch

EDITABLE = ("resid.pre", "attn.q", "attn.k", "attn.v", "attn.z", "attn.out", "mlp.hidden", "mlp.out", "resid.post")


def _dims(hf):
    c = hf.config
    H, K = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    return H, K, D


def hf_run(hf, tokens, am=None, edit=None, sites=None):
    """(logits [B, T, V] float64 numpy, {site: [per layer numpy]}) with `edit(name, layer, value) ->
    value or None` applied at the editable sites (values in capjax's layout, see capjax.sites)."""
    H, K, D = _dims(hf)
    got: dict[str, list] = {}
    handles = []

    def put(name, l, v):
        """Records v (capjax layout) after the edit; returns the edited tensor (or None: unchanged)."""
        new = edit(name, l, v) if edit is not None and name in EDITABLE else None
        out = v if new is None else new
        if sites is None or name in sites:
            got.setdefault(name, [None] * len(hf.model.layers))[l] = out.detach().double().numpy().copy()
        return new

    sandwich = hasattr(hf.model.layers[0], "pre_feedforward_layernorm")
    for l, layer in enumerate(hf.model.layers):
        att, mlp = layer.self_attn, layer.mlp

        def pre_layer(m, args, kwargs, l=l):
            new = put("resid.pre", l, args[0])
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)

        def post_layer(m, args, kwargs, out, l=l):
            return put("resid.post", l, out[0] if isinstance(out, tuple) else out)

        handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
        handles.append(layer.register_forward_hook(post_layer, with_kwargs=True))

        def heads(name, n, l=l, transposed=False):
            def hook(m, args, out):
                if transposed:  # [B, n, T, D] (Gemma 3 normalises after the transpose)
                    new = put(name, l, out.transpose(1, 2))
                    return None if new is None else new.transpose(1, 2)
                new = put(name, l, out.reshape(*out.shape[:2], n, D))
                return None if new is None else new.reshape(out.shape)

            return hook

        if hasattr(att, "qkv_proj"):  # Phi-3: fused q, k, v (read only)

            def qkv(m, args, out, l=l):
                q, k, v = out.split([H * D, K * D, K * D], dim=-1)
                for name, a, n in (("attn.q", q, H), ("attn.k", k, K), ("attn.v", v, K)):
                    if sites is None or name in sites:
                        got.setdefault(name, [None] * len(hf.model.layers))[l] = (
                            a.reshape(*a.shape[:2], n, D).double().numpy().copy()
                        )

            handles.append(att.qkv_proj.register_forward_hook(qkv))
        else:
            qmod = att.q_norm if hasattr(att, "q_norm") else att.q_proj
            kmod = att.k_norm if hasattr(att, "k_norm") else att.k_proj
            tr = hasattr(att, "q_norm") and hf.config.model_type.startswith("gemma3")
            handles += [
                qmod.register_forward_hook(heads("attn.q", H, transposed=tr)),
                kmod.register_forward_hook(heads("attn.k", K, transposed=tr)),
                att.v_proj.register_forward_hook(heads("attn.v", K)),
            ]

        def z(m, args, l=l):
            x = args[0]
            new = put("attn.z", l, x.reshape(*x.shape[:2], H, D))
            return None if new is None else (new.reshape(x.shape),) + tuple(args[1:])

        def attn_out(m, args, out, l=l):
            return put("attn.out", l, out)

        def pattern(m, args, out, l=l):
            if out[1] is not None and (sites is None or "attn.pattern" in sites):
                got.setdefault("attn.pattern", [None] * len(hf.model.layers))[l] = out[1].double().numpy().copy()

        mid_norm = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm

        def mid(m, args, l=l):
            put("resid.mid", l, args[0])

        def attn_in(m, args, l=l):
            put("attn.in", l, args[0])

        def mlp_in(m, args, l=l):
            put("mlp.in", l, args[0])

        def hidden(m, args, l=l):
            new = put("mlp.hidden", l, args[0])
            return None if new is None else (new,) + tuple(args[1:])

        def mlp_out(m, args, out, l=l):
            return put("mlp.out", l, out)

        handles += [
            att.o_proj.register_forward_pre_hook(z),
            att.o_proj.register_forward_hook(attn_out),
            att.register_forward_hook(pattern),
            mid_norm.register_forward_pre_hook(mid),
            (att.qkv_proj if hasattr(att, "qkv_proj") else att.q_proj).register_forward_pre_hook(attn_in),
            mlp.register_forward_pre_hook(mlp_in),
            mlp.down_proj.register_forward_pre_hook(hidden),
            mlp.register_forward_hook(mlp_out),
        ]
    try:
        with torch.no_grad():
            kwargs = {} if am is None else {"attention_mask": torch.tensor(np.asarray(am))}
            logits = hf(torch.tensor(np.asarray(tokens)), **kwargs).logits.double().numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, got
