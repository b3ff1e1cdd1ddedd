"""On-disk size of the compressed-tensors export vs the dense folder, SmolLM2-135M-Instruct pruned
50% by magnitude (2:4 and unstructured), float32 and bfloat16; the docs/using.md table.

    python scripts/compressed_size.py [OUT_DIR]
"""

import json
import sys
import time
from pathlib import Path

import capjax


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("model*.safetensors"))


def main(base: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        model, params = capjax.load_pretrained("smollm2-135m-instruct", dtype=dtype)
        for label, kw in (("2:4", dict(nm="2:4")), ("unstructured 50%", {})):
            pruned, _ = capjax.prune(model, params, "magnitude", 0.5, **kw)
            d = capjax.save_pretrained(model, pruned, base / f"dense_{dtype}")
            t = time.time()
            c = capjax.save_pretrained(model, pruned, base / f"ct_{dtype}", sparsity_format="compressed-tensors")
            w = time.time() - t
            fmt = json.loads((c / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"]
            print(
                f"{dtype} {label}: dense {size(d) / 2**20:.1f} MiB, compressed ({fmt}) {size(c) / 2**20:.1f} MiB, "
                f"ratio {size(c) / size(d):.3f}, write {w:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/compressed_size"))
