"""How long the quality report takes on models of many layers (issue 15: < 10 s at 7B-class layer
counts), each in a fresh process (imports included), and how big the page is.

The report reads the weights' metadata columns only, so its time follows the number of layers,
not their size: the models here have the real layer structures at small widths.

    .venv/bin/python benchmarks/bench_report.py [--workdir W]

- SDXL-shaped UNet (diffusers UNet2DConditionModel with SDXL's block layout: 1 / 2 / 10
  transformer layers per block, at channels 32 / 64 / 128), data-free, profile edge.
- A 300-block DiT (each block: qkv, out, fc1, fc2, adaLN; width 64; 1,500+ layers), recorded
  along 12 timesteps and quantized at W4A8 with timestep-aware GPTQ: the heatmap per block.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t = time.perf_counter()
import arrow_quant_v2 as aq
path = aq.report(sys.argv[1], sys.argv[2])
import os
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": os.path.getsize(path)}))
"""


def sdxl_unet(root: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
        norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=16 * 6 + 64, use_linear_projection=True)
    unet.save_pretrained(root)


def deep_dit(root: str, blocks: int = 300, d: int = 64) -> None:
    import torch
    from torch import nn

    from arrow_quant_v2.calibration import CalibrationRecorder
    from arrow_quant_v2.safetensors_writer import write_safetensors

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.adaLN_modulation = nn.Linear(d, 2 * d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x, c):
            s, b = self.adaLN_modulation(c).chunk(2, -1)
            h = x * (1 + s) + b
            q, k, v = self.qkv(h).chunk(3, -1)
            x = x + 0.1 * self.proj(torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v)
            return x + 0.1 * self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.t_embed = nn.Linear(2, d)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))

        def forward(self, x, t):
            c = self.t_embed(torch.stack([torch.sin(t / 1000), torch.cos(t / 1000)], -1))[:, None]
            for blk in self.blocks:
                x = blk(x, c)
            return x

    torch.manual_seed(0)
    model = DiT().eval()
    os.makedirs(root, exist_ok=True)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_safetensors(os.path.join(root, "model.safetensors"), [(k, "F32", tuple(v.shape)) for k, v in state.items()],
                      lambda k: state[k])
    with CalibrationRecorder(model, num_bins=4, max_samples=12, total_calls=12, input_samples=16) as rec, \
            torch.no_grad():
        for t in range(999, 0, -84):
            with rec.step(float(t)):
                model(torch.randn(2, 8, d), torch.full((2,), float(t)))
    rec.save(os.path.join(root, "calibration.parquet"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="aq-report-bench-")
    import arrow_quant_v2 as aq

    try:
        rows = []
        unet = os.path.join(work, "sdxl-unet")
        if not os.path.exists(unet):
            sdxl_unet(unet)
        r = aq.ArrowQuantV2().quantize_diffusion_model(unet, unet + "-edge",
                                                       aq.DiffusionQuantConfig.from_profile("edge", overwrite=True))
        rows.append(("SDXL-shaped UNet (channels / 10), edge, data-free", unet + "-edge", len(r["layers"])))
        dit = os.path.join(work, "dit300")
        if not os.path.exists(dit):
            deep_dit(dit)
        r = aq.ArrowQuantV2().quantize_diffusion_model(dit, dit + "-w4a8", aq.DiffusionQuantConfig(
            bit_width=4, group_size=32, activation_bits=8, num_time_groups=4, overwrite=True))
        rows.append(("300-block DiT, W4A8, timestep-aware GPTQ", dit + "-w4a8", len(r["layers"])))
        print("| model | tensors | report (fresh process) | page |\n|---|---|---|---|")
        for name, path, n in rows:
            out = subprocess.run([sys.executable, "-c", CHILD, path, path + ".report.html"], capture_output=True,
                                 text=True, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {n} | {d['seconds']:.1f} s | {d['bytes'] / 1024:.0f} KiB |")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
