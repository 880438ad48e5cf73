"""Convert a pre-trained diffusers directory's pickle-format weights (*.bin) to safetensors, in place.

    python scripts/to_safetensors.py <diffusers directory>

The pipeline never unpickles weights (pipeline/pretrained.py refuses them; docs/bad-input.md). This one-off reads
each file with torch.load(weights_only=True) — tensors only, no code — and writes the safetensors name diffusers
and transformers look for beside it (diffusion_pytorch_model.bin → diffusion_pytorch_model.safetensors,
pytorch_model.bin → model.safetensors). Sharded checkpoints (*.bin.index.json) are not handled.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

NAMES = {"pytorch_model.bin": "model.safetensors"}


def convert(root: Path) -> list[Path]:
    written = []
    for src in sorted(root.rglob("*.bin")):
        dest = src.with_name(NAMES.get(src.name, src.with_suffix(".safetensors").name))
        if dest.exists():
            continue
        state = torch.load(src, map_location="cpu", weights_only=True)
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(dest))
        written.append(dest)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/to_safetensors.py <diffusers directory>")
    for path in convert(Path(sys.argv[1])):
        print(f"wrote {path}")
