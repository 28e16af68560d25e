"""Two small trained diffusion models for judging diffusion-aware quantization, in pure PyTorch.

* ``DiT``: a class-conditional Diffusion Transformer (Peebles & Xie's layout and tensor names:
  ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``,
  ``blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``,
  ``final_layer.{linear, adaLN_modulation.1}``) on scikit-learn's bundled 8x8 digits, epsilon
  prediction under a DDPM schedule (T=1000, linear betas), sampled with deterministic DDIM.
* ``MaskedDiffusionLM``: a character-level masked diffusion language model (LLaDA / MDLM style:
  a bidirectional transformer with RoPE, RMSNorm and SwiGLU, no timestep input) on the English
  text of CPython's bundled documentation (``pydoc_data.topics``), sampled from all-[MASK] with
  LLaDA's low-confidence remasking.

Also: the digits classifier used to score generated digits (accuracy of class-conditional samples
and a Frechet distance on its features), loaders that build a model from ``config.json`` and load
``model.safetensors`` or any ``{name: numpy array | torch.Tensor}`` state dict (a quantized then
dequantized one), and reference-vs-model divergence along a sampling trajectory (per-step
epsilon error for the DiT; per-step logit KL and token agreement for the LM).

Everything is deterministic given a seed (on one machine and thread count).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_DIR = os.path.join(HERE, "digits_dit")
CLASSIFIER_DIR = os.path.join(HERE, "digits_classifier")
TEXT_DIR = os.path.join(HERE, "text_mdlm")

StateDict = Mapping[str, Union[np.ndarray, torch.Tensor]]

# =============================================================================================
# Shared helpers
# =============================================================================================


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DiT / ADM: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _to_tensor(v: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).cpu()
    a = np.asarray(v)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.float() if t.is_floating_point() else t


def load_state_dict_arrays(module: nn.Module, state: StateDict, strict: bool = True) -> nn.Module:
    """Loads ``{name: numpy array | torch.Tensor}`` (any float dtype, e.g. a dequantized state dict)
    into ``module`` as float32. Names may carry one leading ``component/`` prefix (stripped when
    the bare names do not match). Shapes must match; with ``strict`` every parameter must be
    present and no unknown name may appear."""
    own = module.state_dict()
    tensors = {k: _to_tensor(v) for k, v in state.items()}
    if not (set(tensors) & set(own)):
        stripped = {k.split("/", 1)[-1]: v for k, v in tensors.items()}
        if set(stripped) & set(own):
            tensors = stripped
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in tensors.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the state dict, {tuple(own[k].shape)} in the model")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items() if k in own}, strict=strict)
    return module


def _read_config(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _load_weights(model: nn.Module, path: str, state_dict: Optional[StateDict]) -> nn.Module:
    if state_dict is None:
        from safetensors.torch import load_file

        state_dict = load_file(os.path.join(path, "model.safetensors"))
    load_state_dict_arrays(model, state_dict)
    return model.eval()


def save_model(model: nn.Module, path: str, config: Dict[str, Any]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (float32, persistent tensors only)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=False)
        f.write("\n")
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# =============================================================================================
# 1. Image: DiT on 8x8 digits
# =============================================================================================

DIT_DEFAULT_CONFIG: Dict[str, Any] = {
    "_class_name": "DiT",
    "architectures": ["DiT"],
    "model_type": "dit",
    "input_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "hidden_size": 128,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "num_classes": 10,
    "class_dropout_prob": 0.1,
    "frequency_embedding_size": 256,
    "prediction_type": "epsilon",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; label ``num_classes`` is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a[:, None] * self.attn(modulate(self.norm1(x), sh_a, sc_a))
        return x + g_m[:, None] * self.mlp(modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)  # (grid*grid, dim)
    return torch.from_numpy(emb).float()


class DiT(nn.Module):
    """Class-conditional DiT. ``forward(x, t, y)``: x (B, C, H, W) noisy images, t (B,) timesteps in
    [0, T), y (B,) labels in [0, num_classes] (num_classes = null class) -> predicted noise, same
    shape as x."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        c = {**DIT_DEFAULT_CONFIG, **dict(config)}
        self.config = c
        d, p = c["hidden_size"], c["patch_size"]
        self.in_channels = self.out_channels = c["in_channels"]
        self.patch_size = p
        self.grid = c["input_size"] // p
        self.num_classes = c["num_classes"]
        self.x_embedder = PatchEmbed(p, c["in_channels"], d)
        self.t_embedder = TimestepEmbedder(d, c["frequency_embedding_size"])
        self.y_embedder = LabelEmbedder(c["num_classes"], d)
        self.register_buffer("pos_embed", _sincos_pos_embed_2d(d, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(d, c["num_heads"], c["mlp_ratio"]) for _ in range(c["depth"])])
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, p, g, C = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.final_layer(h, c))


class DDPMSchedule:
    """DDPM noise schedule (linear betas by default): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self.T = num_train_timesteps
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        self.betas = torch.from_numpy(betas).float()
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas)).float()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDPMSchedule":
        c = {**DIT_DEFAULT_CONFIG, **dict(config)}
        return cls(c["num_train_timesteps"], c["beta_start"], c["beta_end"])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_timesteps(self, steps: int) -> List[int]:
        """``steps`` timesteps from T-1 down to 0, evenly spaced ("trailing" spacing)."""
        return [int(v) for v in np.round(np.linspace(self.T - 1, 0, steps)).astype(np.int64)]


def load_digits_data() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits as (x (N, 1, 8, 8) float32 in [-1, 1], y (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, torch.from_numpy(d.target.astype(np.int64))


def _default_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % num_classes


@torch.no_grad()
def ddim_sample(
    model: DiT,
    labels: Union[torch.Tensor, Sequence[int], int] = 100,
    steps: int = 50,
    seed: int = 0,
    cfg_scale: float = 1.0,
    clip_x0: bool = True,
    schedule: Optional[DDPMSchedule] = None,
    noise: Optional[torch.Tensor] = None,
    return_trajectory: bool = False,
    callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
    batch_size: int = 1000,
) -> Union[torch.Tensor, Tuple[torch.Tensor, List[Dict[str, Any]]]]:
    """Deterministic DDIM (eta = 0) sampling of class-conditional digits.

    labels: a tensor/list of class ids, or an int n meaning ``arange(n) % 10`` (n/10 per class).
    The initial noise comes from ``torch.Generator().manual_seed(seed)`` (or ``noise``), so two
    models sampled with one seed start from the same noise. ``cfg_scale`` != 1 applies
    classifier-free guidance (two forward passes per step). ``callback(i, t, x_t, eps)`` runs after
    each model evaluation. Returns samples (B, 1, 8, 8) in [-1, 1]; with ``return_trajectory`` also a
    list of ``{"step": i, "t": t, "x_t": x_t, "eps": eps}`` (model inputs and outputs at every step:
    calibration data for timestep-aware quantization)."""
    if isinstance(labels, int):
        labels = _default_labels(labels, model.num_classes)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    schedule = schedule or DDPMSchedule.from_config(model.config)
    shape = (labels.shape[0], model.in_channels, model.grid * model.patch_size, model.grid * model.patch_size)
    x = noise.clone().float() if noise is not None else torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ts = schedule.ddim_timesteps(steps)
    abar = schedule.alphas_cumprod
    traj: List[Dict[str, Any]] = []
    was_training = model.training
    model.eval()
    for i, t in enumerate(ts):
        eps = _dit_eps(model, x, t, labels, cfg_scale, batch_size)
        if callback is not None:
            callback(i, t, x, eps)
        if return_trajectory:
            traj.append({"step": i, "t": t, "x_t": x.clone(), "eps": eps.clone()})
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    model.train(was_training)
    x = x.clamp(-1, 1)
    return (x, traj) if return_trajectory else x


def _dit_eps(model: DiT, x: torch.Tensor, t: int, labels: torch.Tensor, cfg_scale: float, batch_size: int) -> torch.Tensor:
    outs = []
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s : s + batch_size], labels[s : s + batch_size]
        tb = torch.full((xb.shape[0],), t, dtype=torch.int64)
        if cfg_scale == 1.0:
            outs.append(model(xb, tb, yb))
        else:
            null = torch.full_like(yb, model.num_classes)
            e = model(torch.cat([xb, xb]), torch.cat([tb, tb]), torch.cat([yb, null]))
            ec, eu = e.chunk(2)
            outs.append(eu + cfg_scale * (ec - eu))
    return torch.cat(outs)


@torch.no_grad()
def dit_denoising_loss(
    model: DiT, x0: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, seed: int = 0,
    timesteps: Optional[Sequence[int]] = None, num_groups: int = 10,
) -> Dict[str, Any]:
    """Epsilon-prediction MSE on real digits (default: all 1797) with fixed seeded noise, for each
    timestep in ``timesteps`` (default: ``num_groups`` evenly spaced, the centres of the timestep
    groups). Returns ``{"timesteps": [...], "mse": [...], "mean": float}``."""
    if x0 is None:
        x0, y = load_digits_data()
    sched = DDPMSchedule.from_config(model.config)
    if timesteps is None:
        w = sched.T / num_groups
        timesteps = [int(w * (g + 0.5)) for g in range(num_groups)]
    g = torch.Generator().manual_seed(seed)
    model.eval()
    mses = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((x0.shape[0],), t, dtype=torch.int64)
        eps = model(sched.add_noise(x0, noise, tt), tt, y)
        mses.append(float(F.mse_loss(eps, noise)))
    return {"timesteps": list(timesteps), "mse": mses, "mean": float(np.mean(mses))}


@torch.no_grad()
def dit_stepwise_divergence(
    model: DiT, ref_model: DiT, labels: Union[torch.Tensor, Sequence[int], int] = 100, steps: int = 50,
    seed: int = 0, cfg_scale: float = 1.0,
) -> Dict[str, Any]:
    """Compares ``model`` (e.g. quantized) with ``ref_model`` (full precision).

    * teacher-forced: along the reference DDIM trajectory, the relative error of the model's noise
      prediction at each step, ``||eps - eps_ref||^2 / ||eps_ref||^2`` (``eps_rel_mse_per_step``,
      in sampling order, with the timesteps in ``timesteps``);
    * free-running: both sampled from the same seed; ``sample_mse`` (in [-1, 1] units) and
      ``sample_psnr`` (dB, peak-to-peak 2) between the final images.
    Returns also the two sample batches (``samples``, ``samples_ref``)."""
    ref, traj = ddim_sample(ref_model, labels, steps, seed, cfg_scale, return_trajectory=True)
    if isinstance(labels, int):
        labels = _default_labels(labels, ref_model.num_classes)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    model.eval()
    rel = []
    for st in traj:
        eps = _dit_eps(model, st["x_t"], st["t"], labels, cfg_scale, 1000)
        rel.append(float(((eps - st["eps"]) ** 2).sum() / (st["eps"] ** 2).sum()))
    out = ddim_sample(model, labels, steps, seed, cfg_scale)
    mse = float(((out - ref) ** 2).mean())
    return {
        "timesteps": [st["t"] for st in traj], "eps_rel_mse_per_step": rel, "eps_rel_mse_mean": float(np.mean(rel)),
        "sample_mse": mse, "sample_psnr": float(10 * math.log10(4.0 / max(mse, 1e-12))),
        "samples": out, "samples_ref": ref,
    }


def load_digits_dit(path: str = DIGITS_DIR, state_dict: Optional[StateDict] = None) -> DiT:
    """Builds the DiT from ``path/config.json`` and loads ``path/model.safetensors``, or
    ``state_dict`` (``{name: numpy array | torch.Tensor}``, e.g. dequantized weights) when given.
    Returns the module in eval mode, float32."""
    return _load_weights(DiT(_read_config(path)), path, state_dict)


# ---------------------------------------------------------------------------------------------
# Digits classifier and sample scores
# ---------------------------------------------------------------------------------------------

CLASSIFIER_DEFAULT_CONFIG: Dict[str, Any] = {
    "architectures": ["DigitsClassifier"], "model_type": "digits_mlp_classifier",
    "in_features": 64, "hidden_size": 128, "num_classes": 10,
}


class DigitsClassifier(nn.Module):
    """MLP 64 -> 128 -> 128 -> 10 on [-1, 1] digits; ``features`` is the penultimate layer."""

    def __init__(self, config: Mapping[str, Any] = CLASSIFIER_DEFAULT_CONFIG) -> None:
        super().__init__()
        c = {**CLASSIFIER_DEFAULT_CONFIG, **dict(config)}
        self.config = c
        h = c["hidden_size"]
        self.fc1 = nn.Linear(c["in_features"], h)
        self.fc2 = nn.Linear(h, h)
        self.head = nn.Linear(h, c["num_classes"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_classifier(path: str = CLASSIFIER_DIR) -> DigitsClassifier:
    return _load_weights(DigitsClassifier(_read_config(path)), path, None)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr sqrt(s1 s2) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1))), all symmetric PSD
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@torch.no_grad()
def digits_score(
    samples: torch.Tensor, labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    classifier: Optional[DigitsClassifier] = None, real: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Scores generated digits (B, 1, 8, 8) in [-1, 1] with the digits classifier:
    ``accuracy`` (argmax == intended label; only with ``labels``), ``confidence`` (mean softmax
    probability of the intended label, or of the argmax without labels), and ``fd`` (Frechet
    distance between the classifier's 128-d penultimate features of the samples and of ``real``,
    default all 1797 real digits). Lower fd is better; real-vs-real (two halves) is about the
    floor at this sample size."""
    clf = classifier or load_digits_classifier()
    clf.eval()
    samples = samples.float().clamp(-1, 1)
    logits = clf(samples)
    p = logits.softmax(-1)
    out: Dict[str, float] = {}
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        out["accuracy"] = float((logits.argmax(-1) == labels).float().mean())
        out["confidence"] = float(p.gather(1, labels[:, None]).mean())
    else:
        out["confidence"] = float(p.max(-1).values.mean())
    if real is None:
        if getattr(clf, "_real_features", None) is None:  # cached on the classifier
            clf._real_features = clf.features(load_digits_data()[0]).numpy()
        real_f = clf._real_features
    else:
        real_f = clf.features(real.float()).numpy()
    out["fd"] = frechet_distance(clf.features(samples).numpy(), real_f)
    return out


# =============================================================================================
# 2. Text: masked diffusion LM on CPython's documentation
# =============================================================================================

# Characters: '\n' and printable ASCII, then [UNK], then [MASK] (last, so logits[..., :-1] is the
# distribution over real tokens). Common typographic characters are folded to ASCII first.
CHARS: List[str] = ["\n"] + [chr(c) for c in range(32, 127)]
UNK_TOKEN, MASK_TOKEN = "[UNK]", "[MASK]"
NORMALIZE = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": "--",
             "\u2013": "-", "\t": "    ", "\u00a0": " "}

MDLM_DEFAULT_CONFIG: Dict[str, Any] = {
    "architectures": ["MaskedDiffusionLM"],
    "model_type": "mdlm",
    "vocab_size": len(CHARS) + 2,
    "mask_token_id": len(CHARS) + 1,
    "unk_token_id": len(CHARS),
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 64,
    "seq_len": 64,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


class Tokenizer:
    """Character tokenizer over ``CHARS`` + [UNK] + [MASK] (``vocab.json`` = ``{token: id}``)."""

    def __init__(self, vocab: Optional[Mapping[str, int]] = None) -> None:
        if vocab is None:
            vocab = {ch: i for i, ch in enumerate(CHARS + [UNK_TOKEN, MASK_TOKEN])}
        self.stoi = dict(vocab)
        self.itos = {i: s for s, i in self.stoi.items()}
        self.unk_id, self.mask_id = self.stoi[UNK_TOKEN], self.stoi[MASK_TOKEN]
        self.vocab_size = len(self.stoi)

    @classmethod
    def from_dir(cls, path: str = TEXT_DIR) -> "Tokenizer":
        with open(os.path.join(path, "vocab.json")) as f:
            return cls(json.load(f))

    @staticmethod
    def normalize(text: str) -> str:
        return "".join(NORMALIZE.get(ch, ch) for ch in text)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(ch, self.unk_id) for ch in self.normalize(text)]

    def decode(self, ids: Union[Sequence[int], torch.Tensor], mask: str = "_") -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            s = self.itos[int(i)]
            out.append(mask if i == self.mask_id else ("?" if i == self.unk_id else s))
        return "".join(out)


def load_text_corpus(split: str = "train", tokenizer: Optional[Tokenizer] = None, val_fraction: float = 0.05,
                     collapse_spaces: bool = True) -> torch.Tensor:
    """The English text of ``pydoc_data.topics`` (sorted by topic, joined by blank lines) as a 1-D
    int64 token tensor; ``split`` = "train" (first 95%), "val" (last 5%) or "all". With
    ``collapse_spaces`` (the models' setting) runs of spaces (indentation, tables) become one space.
    The corpus comes with the running CPython, so it varies slightly between Python versions."""
    import re

    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    if collapse_spaces:
        text = re.sub(" {2,}", " ", text)
    ids = torch.tensor((tokenizer or Tokenizer()).encode(text), dtype=torch.int64)
    cut = int(len(ids) * (1 - val_fraction))
    if split == "train":
        return ids[:cut]
    if split == "val":
        return ids[cut:]
    if split == "all":
        return ids
    raise ValueError(f"split must be train, val or all; got {split!r}")


def random_crops(data: torch.Tensor, n: int, seq_len: int = 64, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from ``data`` (deterministic given the seed)."""
    g = generator or torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (n,), generator=g)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def val_windows(seq_len: int = 64, tokenizer: Optional[Tokenizer] = None, collapse_spaces: bool = True) -> torch.Tensor:
    """The validation split cut into consecutive non-overlapping windows of ``seq_len`` tokens."""
    v = load_text_corpus("val", tokenizer, collapse_spaces=collapse_spaces)
    n = len(v) // seq_len
    return v[: n * seq_len].reshape(n, seq_len)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class BidirectionalAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v)  # no causal mask
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MDLMBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = BidirectionalAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class MaskedDiffusionLM(nn.Module):
    """Bidirectional transformer over character tokens. ``forward(ids)`` (B, L) int64 -> logits
    (B, L, vocab_size). No timestep input (the mask ratio is implied by the input, as in LLaDA)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        c = {**MDLM_DEFAULT_CONFIG, **dict(config)}
        self.config = c
        d, h = c["hidden_size"], c["num_attention_heads"]
        self.mask_token_id = c["mask_token_id"]
        self.vocab_size = c["vocab_size"]
        self.seq_len = c["seq_len"]
        self.tok_embed = nn.Embedding(c["vocab_size"], d)
        self.blocks = nn.ModuleList([MDLMBlock(d, h, c["intermediate_size"], c["rms_norm_eps"])
                                     for _ in range(c["num_hidden_layers"])])
        self.norm_f = RMSNorm(d, c["rms_norm_eps"])
        self.lm_head = nn.Linear(d, c["vocab_size"], bias=False)
        hd = d // h
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.outer(torch.arange(c["max_position_embeddings"], dtype=torch.float64), inv)
        self.register_buffer("rope_cos", ang.cos().float(), persistent=False)
        self.register_buffer("rope_sin", ang.sin().float(), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down_proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * len(self.blocks)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        x = self.tok_embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.lm_head(self.norm_f(x))


def mdlm_mask(x0: torch.Tensor, mask_id: int, generator: torch.Generator, eps: float = 1e-3,
              ratio: Optional[Union[float, torch.Tensor]] = None,
              stratified: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA forward process: per sequence ratio r ~ U(eps, 1) (or ``ratio``), each token masked with
    probability r; ``stratified`` draws the B ratios one per 1/B stratum (MDLM's low-discrepancy
    sampler). Returns (x_t, masked (bool), r (B,))."""
    B, L = x0.shape
    if ratio is None:
        u = (torch.arange(B) + torch.rand(1, generator=generator)) / B if stratified else torch.rand(B, generator=generator)
        r = (1 - eps) * u + eps
    else:
        r = torch.as_tensor(ratio, dtype=torch.float32).expand(B).clone()
    masked = torch.rand(B, L, generator=generator) < r[:, None]
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, r


def mdlm_loss(model: MaskedDiffusionLM, x0: torch.Tensor, generator: torch.Generator,
              ratio: Optional[Union[float, torch.Tensor]] = None, stratified: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """MDLM / LLaDA objective on clean tokens ``x0``: (weighted loss = sum over masked tokens of
    CE / r, divided by B*L -- an upper bound on the NLL in nats per token; plain masked CE mean)."""
    xt, masked, r = mdlm_mask(x0, model.mask_token_id, generator, ratio=ratio, stratified=stratified)
    logits = model(xt)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none").view_as(x0)
    ce = ce * masked
    weighted = (ce / r[:, None]).sum() / x0.numel()
    plain = ce.sum() / masked.sum().clamp(min=1)
    return weighted, plain


@torch.no_grad()
def mdlm_eval(model: MaskedDiffusionLM, data: Optional[torch.Tensor] = None, seed: int = 0,
              ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), repeats: int = 1) -> Dict[str, Any]:
    """Masked-token cross-entropy (nats) on validation windows (default: ``val_windows()``) at fixed
    mask ratios, with seeded masks; ``nelbo_bpc`` integrates the weighted loss over the ratios
    (midpoint rule, a bits-per-character upper bound). Also top-1 accuracy on masked tokens."""
    data = val_windows(model.seq_len) if data is None else data
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ce_r, acc_r = [], []
    for r in ratios:
        tot, cnt, hit = 0.0, 0, 0
        for _ in range(repeats):
            xt, masked, _ = mdlm_mask(data, model.mask_token_id, g, ratio=r)
            logits = model(xt)[..., :-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.reshape(-1), reduction="none").view_as(data)
            tot += float((ce * masked).sum())
            cnt += int(masked.sum())
            hit += int(((logits.argmax(-1) == data) & masked).sum())
        ce_r.append(tot / max(cnt, 1))
        acc_r.append(hit / max(cnt, 1))
    # E_r[ CE(r) * r / r ] per token: masked fraction r times CE / r = CE averaged over r
    nelbo = float(np.mean(ce_r)) / math.log(2)
    return {"ratios": list(ratios), "masked_ce": ce_r, "masked_acc": acc_r, "mean_ce": float(np.mean(ce_r)),
            "nelbo_bpc": nelbo}


def _transfer_schedule(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts -> (B, steps) tokens to unmask per step (LLaDA: even split, remainder first)."""
    base = num_masked // steps
    rem = num_masked % steps
    sched = base[:, None].repeat(1, steps)
    sched += (torch.arange(steps)[None] < rem[:, None]).long()
    return sched


@torch.no_grad()
def mdlm_sample(
    model: MaskedDiffusionLM,
    num_samples: int = 16,
    seq_len: Optional[int] = None,
    steps: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    remasking: str = "random",
    prompt: Optional[torch.Tensor] = None,
    return_trajectory: bool = False,
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, List[Dict[str, torch.Tensor]]]]:
    """Generates (num_samples, seq_len) tokens from all-[MASK] in ``steps`` steps, unmasking
    ``seq_len / steps`` tokens per step (LLaDA's sampler).

    At each step the model predicts every masked token: ``temperature`` 0 = argmax, > 0 = Gumbel-max
    sampling at that temperature (noise from ``torch.Generator().manual_seed(seed)``, identical for
    any model, so two models differ only through their logits). ``remasking``: "low_confidence"
    commits the predictions with the highest probability, "random" commits seeded-random positions
    (MDLM ancestral order). ``prompt`` (B, P) or (P,) fixes the first P tokens (prompted
    completion). ``callback(step, x, logits)`` runs after each model call. With
    ``return_trajectory`` also returns ``[{"x": state before the step, "logits": logits}]``
    (the model inputs at every step: calibration data)."""
    L = seq_len or model.seq_len
    mask_id = model.mask_token_id
    g = torch.Generator().manual_seed(seed)
    x = torch.full((num_samples, L), mask_id, dtype=torch.int64)
    if prompt is not None:
        prompt = torch.as_tensor(prompt, dtype=torch.int64)
        prompt = prompt.expand(num_samples, -1) if prompt.dim() == 1 else prompt
        x[:, : prompt.shape[1]] = prompt
    sched = _transfer_schedule((x == mask_id).sum(1), steps)
    traj: List[Dict[str, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    for k in range(steps):
        masked = x == mask_id
        logits = model(x)[..., :-1].float()  # never predict [MASK]
        if callback is not None:
            callback(k, x, logits)
        if return_trajectory:
            traj.append({"x": x.clone(), "logits": logits.clone()})
        u = torch.rand(logits.shape, generator=g).clamp_(1e-10, 1 - 1e-7)
        if temperature > 0:
            pred = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
        else:
            pred = logits.argmax(-1)
        if remasking == "low_confidence":
            conf = logits.softmax(-1).gather(-1, pred[..., None])[..., 0]
        elif remasking == "random":
            conf = torch.rand(x.shape, generator=g)
        else:
            raise ValueError(f"remasking must be low_confidence or random; got {remasking!r}")
        conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
        order = conf.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(L).expand_as(order).contiguous())
        commit = (rank < sched[:, k : k + 1]) & masked
        x = torch.where(commit, pred, x)
    model.train(was_training)
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def mdlm_stepwise_divergence(
    model: MaskedDiffusionLM, ref_model: MaskedDiffusionLM, num_samples: int = 64, steps: int = 32, seed: int = 0,
    temperature: float = 1.0, remasking: str = "random", prompt: Optional[torch.Tensor] = None,
    seq_len: Optional[int] = None,
) -> Dict[str, Any]:
    """Compares ``model`` (e.g. quantized) with ``ref_model`` (full precision).

    * teacher-forced, along the reference sampler's trajectory: at each step, over the masked
      positions, ``kl_per_step`` = mean KL(p_ref || p_model) of the token distributions (nats) and
      ``agreement_per_step`` = fraction of positions where the two argmax tokens agree;
    * free-running, both sampled with the same seed (same Gumbel noise):
      ``final_token_agreement`` = fraction of generated (non-prompt) tokens that are equal, and
      ``sequence_match`` = fraction of identical sequences.
    Also returns the token tensors ``samples`` and ``samples_ref``."""
    kw = dict(num_samples=num_samples, seq_len=seq_len, steps=steps, seed=seed, temperature=temperature,
              remasking=remasking, prompt=prompt)
    ref, traj = mdlm_sample(ref_model, return_trajectory=True, **kw)
    model.eval()
    kls, agr = [], []
    for st in traj:
        m = st["x"] == ref_model.mask_token_id
        lp_ref = st["logits"].log_softmax(-1)
        lp = model(st["x"])[..., :-1].float().log_softmax(-1)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
        kls.append(float(kl[m].mean()))
        agr.append(float((lp.argmax(-1) == lp_ref.argmax(-1))[m].float().mean()))
    out = mdlm_sample(model, **kw)
    gen = traj[0]["x"] == ref_model.mask_token_id
    return {
        "kl_per_step": kls, "agreement_per_step": agr, "kl_mean": float(np.mean(kls)),
        "agreement_mean": float(np.mean(agr)),
        "final_token_agreement": float((out == ref)[gen].float().mean()),
        "sequence_match": float((out == ref).all(1).float().mean()),
        "samples": out, "samples_ref": ref,
    }


def load_text_mdlm(path: str = TEXT_DIR, state_dict: Optional[StateDict] = None) -> MaskedDiffusionLM:
    """Builds the masked diffusion LM from ``path/config.json`` and loads ``path/model.safetensors``,
    or ``state_dict`` (``{name: numpy array | torch.Tensor}``) when given. Eval mode, float32. The
    tokenizer: ``Tokenizer.from_dir(path)``."""
    return _load_weights(MaskedDiffusionLM(_read_config(path)), path, state_dict)


def build_from_state_dict(path: str, state_dict: StateDict) -> nn.Module:
    """Either model, chosen by ``path/config.json``'s model_type, with ``state_dict`` loaded."""
    mt = _read_config(path).get("model_type")
    if mt == "dit":
        return load_digits_dit(path, state_dict)
    if mt == "mdlm":
        return load_text_mdlm(path, state_dict)
    raise ValueError(f"{path}: unknown model_type {mt!r}")
