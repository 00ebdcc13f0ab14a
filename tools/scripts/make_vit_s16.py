#!/usr/bin/python3
"""make_vit_s16.py OUT.onnx [--seed N]: writes a ViT-S/16 ONNX model for I/O benchmarks.

The network is torchvision's VisionTransformer (the vit_b_16 architecture) with the ViT-S/16
configuration: 224x224 images, 16x16 patches, 12 layers, 6 heads, hidden size 384, MLP size
1536, 1000 classes (about 22 M parameters, an 88 MB file). Weights are random but fixed by the
seed (torch.manual_seed), so the same seed always gives the same tensors. Exported with ONNX
opset 17 and a dynamic batch dimension ("batch") on input "input" and output "logits".

Needs Debian's python3 with torch/torchvision (run it as /usr/bin/python3, not a pyenv python).
"""
import argparse
import sys

import torch
from torchvision.models.vision_transformer import VisionTransformer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .onnx path")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6,
                              hidden_dim=384, mlp_dim=1536, num_classes=1000)
    # torchvision zero-initialises the classification head; give it random weights too so that
    # every tensor of the file carries data
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, x, args.out, opset_version=17, input_names=["input"],
                      output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"make_vit_s16: wrote {args.out} ({n} parameters, seed {args.seed})", file=sys.stderr)


if __name__ == "__main__":
    main()
