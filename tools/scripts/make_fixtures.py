#!/usr/bin/python3
"""Train the small Fashion-MNIST Vision Transformers that onnx-ptq tests run on, export to ONNX.

Models (all input "input" float32 [batch, 1, 28, 28], output "logits" float32 [batch, 10]):
    vit_tiny      timm-style ViT written here: patch 4 conv stem, class token, learned position
                  embedding, pre-norm blocks, exact (Erf) GELU, final LayerNorm, linear head
    tv_vit        torchvision.models.VisionTransformer, small config, 1-channel conv stem
    swin_tiny     Swin-style: patch 2 stem, window attention (7x7) with shifted windows and
                  relative position bias, patch merging, mean-pool head
    vit_tiny_outlier  function-preserving copy of vit_tiny: for a few channels, LayerNorm gamma and
                  beta are multiplied by a power of two and the next Linear's input columns divided
                  by the same power of two, so post-LN activations carry huge outlier channels while
                  the outputs stay bit-identical in exact power-of-two arithmetic
Each is exported at opset 13 and 17 with a dynamic batch dimension and constant folding, then
evaluated with ONNX Runtime (tools/ort/eval.js) on the 10,000-image test set. The calibration and
test arrays are written by make_data.py (same preprocessing as training).

Usage: /usr/bin/python3 tools/scripts/make_fixtures.py [--out-dir fixtures/models]
           [--data-dir .data] [--epochs N] [--quick] [--models vit_tiny,tv_vit,swin_tiny]
           [--threads 2] [--seed 0] [--no-ort] [--eval-only]
--quick trains each model on 4096 images for 1 epoch (a smoke test of the whole pipeline).
--eval-only re-runs only the ONNX Runtime evaluation of the files listed in OUT_DIR/manifest.json.
"""
import argparse
import copy
import fcntl
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_data  # noqa: E402

REPO = make_data.REPO
NUM_CLASSES = 10
OPSETS = (13, 17)
# Channels given outliers in vit_tiny_outlier and their power-of-two scale factors.
OUTLIER_CHANNELS = (5, 23, 42)
OUTLIER_SCALES = (64.0, 32.0, 64.0)


# ---------------------------------------------------------------------------------------------
# timm-style ViT

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyViT(nn.Module):
    def __init__(self, img=28, patch=4, dim=64, depth=4, heads=4, mlp_ratio=2.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, NUM_CLASSES)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------------------
# torchvision ViT

def make_tv_vit():
    m = torchvision.models.VisionTransformer(image_size=28, patch_size=4, num_layers=4,
                                             num_heads=4, hidden_dim=64, mlp_dim=128,
                                             num_classes=NUM_CLASSES)
    # One input channel instead of three; same init rule torchvision uses for its stem.
    m.conv_proj = nn.Conv2d(1, 64, kernel_size=4, stride=4)
    fan_in = m.conv_proj.in_channels * 4 * 4
    nn.init.trunc_normal_(m.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
    nn.init.zeros_(m.conv_proj.bias)
    return m


# ---------------------------------------------------------------------------------------------
# Swin-style model. Spatial sizes are Python ints taken from the config, so the exported graph
# only has a dynamic batch (-1) in its reshapes.

def window_partition(x, h, w, ws):
    c = x.shape[-1]
    x = x.reshape(-1, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(x, h, w, ws):
    c = x.shape[-1]
    x = x.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, ws):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.ws = ws
        self.rel_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        index = rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]
        self.register_buffer("rel_index", index.reshape(-1), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        n = self.ws * self.ws
        c = self.heads * self.head_dim
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        bias = self.rel_bias_table[self.rel_index].reshape(n, n, self.heads).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, res, ws, shift, mlp_ratio):
        super().__init__()
        self.res = res
        self.ws = min(ws, res)
        self.shift = shift if res > ws else 0
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, heads, self.ws)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if self.shift > 0:
            img = torch.zeros(1, res, res, 1)
            cuts = (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None))
            region = 0
            for hs in cuts:
                for wsl in cuts:
                    img[:, hs, wsl, :] = region
                    region += 1
            mw = window_partition(img, res, res, self.ws).squeeze(-1)
            mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
            self.register_buffer("attn_mask", mask, persistent=False)
        else:
            self.attn_mask = None

    def forward(self, x):
        r, c = self.res, x.shape[-1]
        y = self.norm1(x).reshape(-1, r, r, c)
        if self.shift > 0:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_partition(y, r, r, self.ws)
        y = self.attn(y, self.attn_mask)
        y = window_reverse(y, r, r, self.ws)
        if self.shift > 0:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, r * r, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, res):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        r, c = self.res, x.shape[-1]
        x = x.reshape(-1, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        x = x.reshape(-1, (r // 2) * (r // 2), 4 * c)
        return self.reduction(self.norm(x))


class TinySwin(nn.Module):
    def __init__(self, img=28, patch=2, dim=32, depths=(2, 2), heads=(2, 4), ws=7, mlp_ratio=2.0):
        super().__init__()
        res = img // patch
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.embed_norm = nn.LayerNorm(dim, eps=1e-5)
        layers = []
        for i, (d, h) in enumerate(zip(depths, heads)):
            for j in range(d):
                layers.append(SwinBlock(dim, h, res, ws, 0 if j % 2 == 0 else ws // 2, mlp_ratio))
            if i + 1 < len(depths):
                layers.append(PatchMerging(dim, res))
                dim *= 2
                res //= 2
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, NUM_CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))


# name -> (constructor, peak learning rate, default epochs). Swin costs ~2.5x a ViT per epoch;
# the epoch counts are small because the 2 cores of the build machine are shared.
MODELS = {
    "vit_tiny": (lambda: TinyViT(dim=64, depth=4, heads=4, mlp_ratio=2.0), 1e-3, 4),
    "tv_vit": (make_tv_vit, 1e-3, 4),
    "swin_tiny": (lambda: TinySwin(), 2e-3, 2),
}


# ---------------------------------------------------------------------------------------------
# training / evaluation

def set_determinism(seed, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def train(name, model, lr, xtr, ytr, epochs, seed, batch=128, wd=0.05, log=print):
    g = torch.Generator().manual_seed(seed)
    n = xtr.shape[0]
    steps_per_epoch = n // batch
    total = steps_per_epoch * epochs
    warmup = min(200, total // 10)
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "pos_embed" in pname or "cls_token" in pname
         or "class_token" in pname or "pos_embedding" in pname or "bias_table" in pname
         else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))

    step = 0
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        run_loss, run_n = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = xtr[idx], ytr[idx]
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += float(loss) * xb.shape[0]
            run_n += xb.shape[0]
            step += 1
        log("%s epoch %d/%d loss %.4f (%.0f s)" % (name, ep + 1, epochs, run_loss / run_n,
                                                   time.time() - t0))
    return time.time() - t0


@torch.no_grad()
def torch_top1(model, x, y, batch=500):
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / x.shape[0]


# ---------------------------------------------------------------------------------------------
# outlier variant

def make_outlier_variant(src):
    """Copy of a TinyViT with power-of-two outlier channels after every LayerNorm."""
    m = copy.deepcopy(src)
    pairs = []
    for blk in m.blocks:
        pairs.append((blk.norm1, blk.attn.qkv))
        pairs.append((blk.norm2, blk.mlp.fc1))
    pairs.append((m.norm, m.head))
    with torch.no_grad():
        for ln, lin in pairs:
            for ch, s in zip(OUTLIER_CHANNELS, OUTLIER_SCALES):
                ln.weight[ch] *= s
                ln.bias[ch] *= s
                lin.weight[:, ch] /= s
    return m


@torch.no_grad()
def layernorm_range_ratios(model, x):
    """Per LayerNorm: max over channels of (max-min) / median over channels of (max-min)."""
    lns = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)]
    stats = {}
    hooks = []
    for lname, mod in lns:
        def hook(_m, _inp, out, lname=lname):
            o = out.reshape(-1, out.shape[-1]).double()
            lo, hi = o.min(0).values, o.max(0).values
            if lname in stats:
                lo = torch.minimum(lo, stats[lname][0])
                hi = torch.maximum(hi, stats[lname][1])
            stats[lname] = (lo, hi)
        hooks.append(mod.register_forward_hook(hook))
    model.eval()
    for i in range(0, x.shape[0], 256):
        model(x[i:i + 256])
    for h in hooks:
        h.remove()
    ratios = {}
    for lname, (lo, hi) in stats.items():
        rng = hi - lo
        ratios[lname] = float(rng.max() / rng.median())
    return ratios


# ---------------------------------------------------------------------------------------------
# export / ORT check

def export(model, path, opset):
    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    # torch.nn.MultiheadAttention takes a fused fast path in inference mode that the ONNX
    # exporter cannot trace; grad mode disables that fast path (the traced graph is identical).
    with torch.enable_grad():
        torch.onnx.export(model, dummy, path, opset_version=opset, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)


def ort_eval(path, data_dir):
    cmd = ["node", os.path.join(REPO, "tools", "ort", "eval.js"), path,
           "--data", os.path.join(data_dir, "test_x.npy"),
           "--labels", os.path.join(data_dir, "test_y.npy"), "--batch", "500"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        mt = re.match(r"^(top1|top5): ([0-9.]+)$", line.strip())
        if mt:
            res[mt.group(1)] = float(mt.group(2))
    if "top1" not in res:
        raise SystemExit("make_fixtures: eval.js printed no top1 for %s:\n%s" % (path, out))
    return res


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv):
    ap = argparse.ArgumentParser(description="Train and export the onnx-ptq ViT fixtures")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "fixtures", "models"))
    ap.add_argument("--data-dir", default=make_data.DEFAULT_OUT)
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs for every model (default: per model, see MODELS)")
    ap.add_argument("--quick", action="store_true",
                    help="1 epoch on 4096 training images (pipeline smoke test)")
    ap.add_argument("--models", default="vit_tiny,tv_vit,swin_tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime evaluation")
    ap.add_argument("--eval-only", action="store_true",
                    help="only (re)run the ONNX Runtime evaluation of the files in the manifest")
    args = ap.parse_args(argv)
    names = [s for s in args.models.split(",") if s]
    for nm in names:
        if nm not in MODELS:
            raise SystemExit("make_fixtures: unknown model %r (known: %s)"
                             % (nm, ", ".join(MODELS)))
    if args.epochs is not None and args.epochs <= 0:
        raise SystemExit("make_fixtures: --epochs must be positive")
    os.makedirs(args.out_dir, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    manifest_path = os.path.join(args.out_dir, "manifest.json")
    manifest = {}
    mine = set()  # keys produced (or, with --eval-only, evaluated) by this process

    def load_manifest():
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                return json.load(f)
        return {}

    def save_manifest():
        # Several make_fixtures processes (one per model) may share the manifest: merge this
        # process's entries into the file's current contents under a lock.
        dfd = os.open(args.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            merged = load_manifest()
            merged.update({k: manifest[k] for k in mine})
            tmp = manifest_path + ".tmp%d" % os.getpid()
            with open(tmp, "w") as fh:
                json.dump(merged, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, manifest_path)
        finally:
            os.close(dfd)  # releases the lock

    def ort_all():
        for key in sorted(mine):
            for fname, f in sorted(manifest[key]["files"].items()):
                path = os.path.join(args.out_dir, fname)
                f.update({"ort_" + k: v for k, v in ort_eval(path, args.data_dir).items()})
                log("ORT %s: %s" % (fname, {k: v for k, v in f.items() if k.startswith("ort")}))
                save_manifest()

    if args.eval_only:
        manifest.update(load_manifest())
        mine.update(manifest)
        if not os.path.exists(os.path.join(args.data_dir, "test_x.npy")):
            make_data.write_all(args.data_dir)
        ort_all()
        return 0

    log("writing data to %s" % args.data_dir)
    make_data.write_all(args.data_dir)
    xtr_np, ytr_np = make_data.load_split("train")
    xte_np, yte_np = make_data.load_split("t10k")
    if args.quick:
        xtr_np, ytr_np = xtr_np[:4096], ytr_np[:4096]
    xtr, ytr = torch.from_numpy(xtr_np), torch.from_numpy(ytr_np)
    xte, yte = torch.from_numpy(xte_np), torch.from_numpy(yte_np)
    xcal = torch.from_numpy(np.load(os.path.join(args.data_dir, "calib_x.npy")))

    def record(key, model, torch_acc, epochs, extra=None):
        entry = {"params": sum(p.numel() for p in model.parameters()),
                 "torch_top1": round(torch_acc, 4), "epochs": epochs, "seed": args.seed,
                 "threads": args.threads,
                 "quick": args.quick, "files": {}}
        if extra:
            entry.update(extra)
        for op in OPSETS:
            path = os.path.join(args.out_dir, "%s_op%d.onnx" % (key, op))
            export(model, path, op)
            f = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
            entry["files"][os.path.basename(path)] = f
            log("%s opset %d: %d bytes" % (key, op, f["bytes"]))
        manifest[key] = entry
        mine.add(key)
        save_manifest()

    for nm in names:
        ctor, lr, default_epochs = MODELS[nm]
        epochs = 1 if args.quick else (args.epochs or default_epochs)
        set_determinism(args.seed, args.threads)
        model = ctor()
        secs = train(nm, model, lr, xtr, ytr, epochs, args.seed, log=log)
        acc = torch_top1(model, xte, yte)
        log("%s: trained in %.0f s, torch top1 %.4f, %d params"
            % (nm, secs, acc, sum(p.numel() for p in model.parameters())))
        record(nm, model, acc, epochs)
        if nm == "vit_tiny":
            out = make_outlier_variant(model)
            acc_o = torch_top1(out, xte, yte)
            r_src = layernorm_range_ratios(model, xcal)
            r_out = layernorm_range_ratios(out, xcal)
            log("vit_tiny_outlier: torch top1 %.4f (source %.4f)" % (acc_o, acc))
            log("post-LN max/median channel range ratio: source min %.1f max %.1f, "
                "outlier min %.1f max %.1f" % (min(r_src.values()), max(r_src.values()),
                                              min(r_out.values()), max(r_out.values())))
            record("vit_tiny_outlier", out, acc_o, epochs, {
                "source": "vit_tiny", "outlier_channels": list(OUTLIER_CHANNELS),
                "outlier_scales": list(OUTLIER_SCALES),
                "ln_range_ratio_source": {k: round(v, 2) for k, v in r_src.items()},
                "ln_range_ratio": {k: round(v, 2) for k, v in r_out.items()}})
    if not args.no_ort:
        ort_all()
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
