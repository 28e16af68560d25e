"""llama.cpp loads a Dream-architecture GGUF that we quantized and exported (docs/export.md).

Builds a small Dream-architecture model (transformers' Qwen2ForCausalLM with Dream's layout: q/k/v
biases, grouped-query attention, bidirectional attention in use; random init) with a byte-level BPE
tokenizer.json trained here, quantizes it (Q8_0 and Q4_K), exports each with
`arrow_quant_v2.export_gguf` (arch detected as "dream") and loads it with llama.cpp through
llama-cpp-python's low-level API: the logits of one non-causal forward over a sequence with masked
positions are compared with the torch model holding our dequantized weights, then a short
masked-diffusion generation (unmask the most confident masked position per step) runs in
llama.cpp and in torch from the same prompt (a random-init model's logits are nearly flat, so its
tokens agree only as far as near-ties allow: the logits are the check). Flash attention is off
(on the CPU it holds K and V in float16).

    pip install llama-cpp-python      # builds llama.cpp from source (minutes; pip caches the wheel)
    python benchmarks/interop_llama_cpp.py [--work DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile

import numpy as np
import torch

import arrow_quant_v2 as aq

D, FF, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 320


def build(root: str) -> dict:
    import tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|mask|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50
                            + ["masked diffusion models denoise tokens in parallel"] * 50, trainer=trainer)
    mask_id, eos_id = tok.token_to_id("<|mask|>"), tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    src = os.path.join(root, "dream")
    model.save_pretrained(src)
    tok.save(os.path.join(src, "tokenizer.json"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, f)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["DreamModel"], model_type="Dream", mask_token_id=mask_id, bos_token_id=eos_id,
                  eos_token_id=eos_id)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    return {"src": src, "tok": tok, "mask_id": mask_id, "cfg": cfg}


def torch_logits(model, ids: list) -> np.ndarray:
    x = torch.tensor([ids])
    full = torch.ones(1, 1, len(ids), len(ids), dtype=torch.bool)  # bidirectional, as Dream's
    with torch.no_grad():
        return model(input_ids=x, attention_mask={"full_attention": full}).logits[0].float().numpy()


class LlamaCpp:
    def __init__(self, path: str, n_ctx: int = 64, flash_attn: bool = False) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.diffusion = bool(L.llama_model_is_diffusion(self.model))
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = os.cpu_count() or 1
        # flash attention on the CPU computes attention with K and V in float16; off, the
        # comparison sees the weights' effect alone
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        L.llama_set_causal_attn(self.ctx, False)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def logits(self, ids: list) -> np.ndarray:
        L = self.L
        n = len(ids)
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = n
            if L.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            ptr = L.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                         shape=(n, self.n_vocab)).copy()
        finally:
            L.llama_batch_free(batch)


def generate(logits_fn, prompt: list, gen: int, mask_id: int) -> list:
    ids = prompt + [mask_id] * gen
    for _ in range(gen):
        lg = logits_fn(ids)
        masked = [i for i, t in enumerate(ids) if t == mask_id]
        best = max(masked, key=lambda i: lg[i].max())
        ids[best] = int(lg[best].argmax())
    return ids


def main() -> None:
    from transformers import Qwen2ForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    root = a.work or tempfile.mkdtemp(prefix="aq-llama-cpp-")
    b = build(root)
    prompt = b["tok"].encode("the quick brown fox").ids
    ids = prompt + [b["mask_id"]] * 8
    rows = []
    # f32: every tensor kept (the control: names, hyper-parameters, RoPE and non-causal attention
    # alone); q8_0 / q4_k: our codes, where llama.cpp's CPU matmuls also round the activations to
    # 8-bit blocks (Q8_0 / Q8_K) before the dot products
    for scheme in ("f32", "q8_0", "q4_k"):
        q = os.path.join(root, scheme)
        cfg = (aq.DiffusionQuantConfig(bit_overrides={".*": 16}, overwrite=True) if scheme == "f32" else
               aq.DiffusionQuantConfig(scheme=scheme, enable_fallback=False, overwrite=True))
        aq.ArrowQuantV2().quantize_diffusion_model(b["src"], q, cfg)
        r = aq.export_gguf(q, os.path.join(root, f"{scheme}.gguf"), overwrite=True)
        ours = Qwen2ForCausalLM(b["cfg"]).eval()
        ours.load_state_dict(aq.load(q).to_torch_state_dict(dtype=torch.float32))
        ref = torch_logits(ours, ids)
        lc = LlamaCpp(r["path"])
        got = lc.logits(ids)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        gen_l = generate(lc.logits, prompt, 8, b["mask_id"])
        gen_t = generate(lambda s: torch_logits(ours, s), prompt, 8, b["mask_id"])
        same = sum(x == y for x, y in zip(gen_l, gen_t)) - len(prompt)
        rows.append((scheme, r["arch"], lc.diffusion, err, agree, same))
        print(f"{scheme}: arch {r['arch']}, llama.cpp diffusion model {lc.diffusion}, logits relative error "
              f"{err:.2e}, argmax agreement {agree:.3f}, generated tokens equal {same}/8: "
              f"{b['tok'].decode(gen_l[len(prompt):])!r}", flush=True)
    print("\n| type | llama.cpp arch | is diffusion | logits relative error vs torch (our weights) | argmax agreement "
          "| generated tokens equal |\n|---|---|---|---|---|---|")
    for s, arch, diff, err, agree, same in rows:
        print(f"| {s.upper()} | {arch} | {diff} | {err:.2e} | {agree:.3f} | {same}/8 |")


if __name__ == "__main__":
    main()
