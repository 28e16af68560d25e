"""Trains the two benchmark diffusion models (and the digits classifier) deterministically on CPU.

    python benchmarks/trained/train.py digits|text|classifier|all [--out benchmarks/trained] [--threads 1]

Same seed, machine and thread count -> same weights. ``digits`` trains the classifier first (a few
seconds) and reports the DiT's sample scores; ``text`` prints a sample.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as M  # noqa: E402

DIGITS_TRAIN = {"seed": 0, "steps": 1500, "batch_size": 64, "lr": 3e-3, "warmup": 100, "min_lr_ratio": 0.05,
                "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.995}
TEXT_TRAIN = {"seed": 0, "collapse_spaces": True, "stratified": True, "steps": 1800, "batch_size": 32, "lr": 3e-3, "warmup": 100,
              "min_lr_ratio": 0.05,
              "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": 0.995}
CLASSIFIER_TRAIN = {"seed": 0, "epochs": 400, "lr": 3e-3, "weight_decay": 1e-4, "test_size": 297, "noise_std": 0.1}


def setup(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def lr_at(step: int, cfg: dict) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    p = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    lo = cfg["min_lr_ratio"]
    return cfg["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def make_opt(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.99))


# ---------------------------------------------------------------------------------------------


def train_classifier(out: str, threads: int) -> M.DigitsClassifier:
    cfg = CLASSIFIER_TRAIN
    setup(cfg["seed"], threads)
    t0 = time.time()
    x, y = M.load_digits_data()
    g = torch.Generator().manual_seed(cfg["seed"])
    perm = torch.randperm(len(x), generator=g)
    te, tr = perm[: cfg["test_size"]], perm[cfg["test_size"]:]
    clf = M.DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    for ep in range(cfg["epochs"]):
        xb = x[tr] + cfg["noise_std"] * torch.randn(x[tr].shape, generator=g)  # light noise augmentation
        loss = F.cross_entropy(clf(xb), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc_tr = float((clf(x[tr]).argmax(-1) == y[tr]).float().mean())
        acc_te = float((clf(x[te]).argmax(-1) == y[te]).float().mean())
    config = {**M.CLASSIFIER_DEFAULT_CONFIG, "train": cfg, "train_accuracy": acc_tr, "test_accuracy": acc_te}
    M.save_model(clf, os.path.join(out, "digits_classifier"), config)
    print(f"[classifier] loss {loss.item():.4f}  train acc {acc_tr:.4f}  test acc {acc_te:.4f}  "
          f"({time.time() - t0:.1f}s)", flush=True)
    return clf


def train_digits(out: str, threads: int) -> None:
    cfg = DIGITS_TRAIN
    clf = train_classifier(out, threads)
    setup(cfg["seed"], threads)
    x, y = M.load_digits_data()
    model = M.DiT(M.DIT_DEFAULT_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    sched = M.DDPMSchedule.from_config(model.config)
    opt = make_opt(model, cfg)
    g = torch.Generator().manual_seed(cfg["seed"])
    n_params = M.count_parameters(model)
    print(f"[digits] DiT {n_params:,} parameters; {cfg}", flush=True)
    t0, run = time.time(), []
    for step in range(cfg["steps"]):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, len(x), (cfg["batch_size"],), generator=g)
        x0, yb = x[idx], y[idx].clone()
        drop = torch.rand(cfg["batch_size"], generator=g) < model.config["class_dropout_prob"]
        yb[drop] = model.num_classes
        t = torch.randint(0, sched.T, (cfg["batch_size"],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t, yb), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        ema_update(ema, model, cfg["ema_decay"], step)
        run.append(loss.item())
        if (step + 1) % 250 == 0 or step == 0:
            k = min(len(run), 250)
            print(f"[digits] step {step + 1:5d}  loss(avg last {k}) {sum(run[-k:]) / k:.4f}  "
                  f"lr {lr_at(step, cfg):.2e}  {time.time() - t0:6.1f}s", flush=True)
    train_time = time.time() - t0
    final_loss = sum(run[-250:]) / len(run[-250:])
    ev = M.dit_denoising_loss(ema)
    ev_raw = M.dit_denoising_loss(model)
    t1 = time.time()
    samples = M.ddim_sample(ema, 1000, steps=50, seed=0)
    sc = M.digits_score(samples, M._default_labels(1000), clf)
    real, _ = M.load_digits_data()
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(1))
    floor = M.frechet_distance(clf.features(real[perm[:898]]).detach().numpy(), clf.features(real[perm[898:]]).detach().numpy())
    info = {"train": cfg, "parameters": n_params, "train_time_s": round(train_time, 1),
            "final_train_loss": final_loss, "eval_denoising_mse_ema": ev["mean"], "eval_denoising_mse_raw": ev_raw["mean"],
            "ddim50_1000_samples_seed0": sc, "fd_real_half_vs_half": floor,
            "torch": torch.__version__, "threads": threads}
    print(f"[digits] trained in {train_time:.1f}s; final loss {final_loss:.4f}; denoising MSE (10 t) "
          f"EMA {ev['mean']:.4f} raw {ev_raw['mean']:.4f}", flush=True)
    print(f"[digits] 1000 DDIM-50 samples ({time.time() - t1:.1f}s): {sc}; real half-vs-half FD {floor:.3f}", flush=True)
    M.save_model(ema, os.path.join(out, "digits_dit"), {**M.DIT_DEFAULT_CONFIG, "training": info})
    print(ascii_digits(samples[:20]))


def ascii_digits(x: torch.Tensor) -> str:
    chars = " .:-=+*#%@"
    rows = []
    v = ((x[:, 0] + 1) / 2).clamp(0, 1)
    for r in range(8):
        rows.append("  ".join("".join(chars[min(9, int(p * 10))] for p in v[i, r].tolist()) for i in range(x.shape[0])))
    return "\n".join(rows)


def train_text(out: str, threads: int) -> None:
    cfg = TEXT_TRAIN
    setup(cfg["seed"], threads)
    tok = M.Tokenizer()
    data = M.load_text_corpus("train", tok, collapse_spaces=cfg["collapse_spaces"])
    val = M.val_windows(M.MDLM_DEFAULT_CONFIG["seq_len"], tok, collapse_spaces=cfg["collapse_spaces"])
    model = M.MaskedDiffusionLM(M.MDLM_DEFAULT_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_opt(model, cfg)
    g = torch.Generator().manual_seed(cfg["seed"])
    n_params = M.count_parameters(model)
    print(f"[text] MDLM {n_params:,} parameters; corpus {len(data):,} train / {val.numel():,} val chars; {cfg}", flush=True)
    t0, run, run_p = time.time(), [], []
    for step in range(cfg["steps"]):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg)
        x0 = M.random_crops(data, cfg["batch_size"], model.seq_len, generator=g)
        loss, plain = M.mdlm_loss(model, x0, g, stratified=cfg["stratified"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        ema_update(ema, model, cfg["ema_decay"], step)
        run.append(loss.item())
        run_p.append(plain.item())
        if (step + 1) % 250 == 0 or step == 0:
            k = min(len(run), 250)
            print(f"[text] step {step + 1:5d}  nelbo {sum(run[-k:]) / k:.4f}  masked CE {sum(run_p[-k:]) / k:.4f}  "
                  f"lr {lr_at(step, cfg):.2e}  {time.time() - t0:6.1f}s", flush=True)
    train_time = time.time() - t0
    final = sum(run[-250:]) / len(run[-250:])
    final_p = sum(run_p[-250:]) / len(run_p[-250:])
    ev = M.mdlm_eval(ema, val)
    ev_raw = M.mdlm_eval(model, val)
    print(f"[text] trained in {train_time:.1f}s; final train nelbo {final:.4f} nats/char, masked CE {final_p:.4f}", flush=True)
    print(f"[text] val EMA: {ev['nelbo_bpc']:.4f} bpc, masked acc {ev['masked_acc']}; raw: {ev_raw['nelbo_bpc']:.4f} bpc", flush=True)
    info = {"train": cfg, "parameters": n_params, "train_time_s": round(train_time, 1),
            "final_train_nelbo_nats": final, "final_train_masked_ce": final_p,
            "val_nelbo_bpc_ema": ev["nelbo_bpc"], "val_nelbo_bpc_raw": ev_raw["nelbo_bpc"],
            "val_masked_acc_ema": ev["masked_acc"], "torch": torch.__version__, "threads": threads,
            "python": sys.version.split()[0]}
    path = os.path.join(out, "text_mdlm")
    M.save_model(ema, path, {**M.MDLM_DEFAULT_CONFIG, "training": info})
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(tok.stoi, f, indent=0, ensure_ascii=True)
        f.write("\n")
    for rm, temp in (("random", 1.0), ("low_confidence", 1.0), ("random", 0.0)):
        s = M.mdlm_sample(ema, 4, steps=32, seed=0, temperature=temp, remasking=rm)
        print(f"[text] samples, 32 steps, {rm} remasking, temperature {temp}:")
        for row in s:
            print("   |" + tok.decode(row).replace("\n", "\\n") + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["digits", "text", "classifier", "all"])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override the step count (smoke tests)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training setting (experiments), e.g. --set lr=2e-3; model config keys with cfg.KEY")
    a = ap.parse_args()
    if a.steps is not None:
        DIGITS_TRAIN["steps"] = TEXT_TRAIN["steps"] = a.steps
    for kv in a.set:
        k, v = kv.split("=", 1)
        v = json.loads(v)
        if k.startswith("cfg."):
            (M.DIT_DEFAULT_CONFIG if a.what == "digits" else M.MDLM_DEFAULT_CONFIG)[k[4:]] = v
        else:
            (DIGITS_TRAIN if a.what == "digits" else TEXT_TRAIN)[k] = v
    t0 = time.time()
    if a.what == "classifier":
        train_classifier(a.out, a.threads)
    if a.what in ("digits", "all"):
        train_digits(a.out, a.threads)
    if a.what in ("text", "all"):
        train_text(a.out, a.threads)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
