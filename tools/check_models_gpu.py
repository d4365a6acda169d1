"""Device check: zeroinf's model math in bfloat16 vs transformers in bfloat16, on the GPU.

For each family, a random model of a small but not trivial shape (hidden 1024, 4 layers), made
by transformers itself and loaded back with from_pretrained (no network). Compared: the logits
of a left-padded prefill, then of decode steps through a KV cache (transformers: generate()'s),
fed the tokens that transformers' bf16 greedy generate() chose.
Error = max |ours - ref| / max |ref|.

Gate: vs transformers bf16, error < --tol (2e-2). The float32 columns give each run's distance
from transformers in float32: "ours32~f32" checks the math itself on the device.

Top-k MoE routing is a discontinuity: with random routers a bf16 rounding difference flips an
expert choice for some tokens, and the flips spread through attention (transformers' own bf16
run then differs from its float32 run by more than 2e-2). So Mixtral runs twice: top-4 of 4
experts (no discrete choice: gated like the dense families) and top-2 of 8, gated instead on
float32 parity and on a bf16 error (vs float32) no worse than 1.25x transformers' own.

    python tools/check_models_gpu.py [--device cuda] [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "models"))  # the test-side driver (no streaming)

from driver import Runner, left_padded_batch  # noqa: E402

from zeroinf.tiny import tiny_hf_model  # noqa: E402

BASE = dict(
    vocab_size=8192,
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    max_position_embeddings=2048,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
    rope_theta=500000.0,
)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", dict(num_key_value_heads=4, intermediate_size=2816)),
    "llama3-rope-tied": (
        "llama",
        dict(
            num_key_value_heads=4,
            intermediate_size=2816,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "mistral-window": (
        "mistral",
        dict(num_key_value_heads=4, intermediate_size=2816, sliding_window=24),
    ),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2, intermediate_size=2816)),
    "opt": ("opt", dict(ffn_dim=4096, word_embed_proj_dim=1024)),
    "opt-350m-style": (
        "opt",
        dict(ffn_dim=4096, word_embed_proj_dim=512, do_layer_norm_before=False),
    ),
    "mixtral-4x4": (
        "mixtral",
        dict(
            num_key_value_heads=4,
            intermediate_size=1024,
            num_local_experts=4,
            num_experts_per_tok=4,
        ),
    ),
    "mixtral-8x2": (
        "mixtral",
        dict(
            num_key_value_heads=4,
            intermediate_size=1024,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "gpt-neox": ("gpt_neox", dict(intermediate_size=4096, rotary_pct=0.25)),
    "gpt-neox-sequential": (
        "gpt_neox",
        dict(intermediate_size=4096, rotary_pct=0.25, use_parallel_residual=False),
    ),
}
ROUTED = {"mixtral-8x2"}  # gated against float32 (see the module docstring)
ROUTED_SLACK = 1.25
FP32_TOL = 1e-4
LENGTHS = [37, 12, 64, 50]  # left-padded prompts of different lengths
DECODE_STEPS = 8


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _quick(overrides: dict[str, Any]) -> dict[str, Any]:
    """The same case at 1/8 of the widths, for a CPU smoke run of this script."""
    small = {
        k: v // 8
        for k, v in overrides.items()
        if k in ("intermediate_size", "ffn_dim", "word_embed_proj_dim")
    }
    return {**overrides, **small, "hidden_size": 128, "vocab_size": 512}


@torch.no_grad()
def run_case(model_type: str, overrides: dict[str, Any], device: str, quick: bool) -> dict:
    shape = {**BASE, **overrides}
    model = tiny_hf_model(model_type, seed=0, **(_quick(shape) if quick else shape))
    for p in model.parameters():
        # Round to bfloat16 once: the bf16 and fp32 runs then hold the same weight values
        # (bf16 -> fp32 is exact) and differ only in how they compute.
        p.copy_(p.to(torch.bfloat16))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = json.loads((Path(folder) / "config.json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            tensors.update(load_file(f))
        # Loaded the way users load it (from_pretrained keeps rotary inv_freq in float32).
        hf = {
            dt: AutoModelForCausalLM.from_pretrained(folder, dtype=dt).to(device).eval()
            for dt in (torch.bfloat16, torch.float32)
        }
    del model
    hf[torch.bfloat16].generation_config.eos_token_id = None  # random weights emit it too
    ours = {dt: Runner(config, tensors, dt).to(device) for dt in hf}
    del tensors

    B = len(LENGTHS)
    ids, mask = left_padded_batch(LENGTHS, config["vocab_size"], seed=1)
    ids, mask = ids.to(device), mask.to(device)
    real = mask.bool()
    P = ids.shape[1]
    gen = hf[torch.bfloat16].generate(
        ids,
        attention_mask=mask,
        max_new_tokens=DECODE_STEPS,
        min_new_tokens=DECODE_STEPS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq = gen.sequences  # [B, P + n]: every run below is fed these same tokens
    full_mask = torch.cat([mask, mask.new_ones(B, DECODE_STEPS)], dim=1)

    def hf_logits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Positions as generate() derives them from the mask (forward alone would count the
        # padding; rotary is shift invariant, its bf16 rounding is not).
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        out = hf[dtype](input_ids=seq, attention_mask=full_mask, position_ids=pos).logits
        return out[:, :P][real].float(), out[:, P - 1 : -1].float()  # prefill, decode

    def our_logits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        r = ours[dtype]
        kvs = r.new_cache(B, P + DECODE_STEPS, device)
        pre = r.forward(ids, mask, kvs, 0)  # [B, P, V]
        steps = [pre[:, -1]]
        for i in range(DECODE_STEPS - 1):  # decode through the KV cache, a token a step
            tok = seq[:, P + i : P + i + 1]
            steps.append(r.forward(tok, full_mask[:, : P + i + 1], kvs, P + i)[:, -1])
        return pre[real], torch.stack(steps, 1)

    # bf16 decode reference: generate()'s own steps through its KV cache, like ours (a
    # full-sequence forward rounds differently: other matmul shapes).
    ref16 = hf_logits(torch.bfloat16)[0], torch.stack(gen.logits, 1).float()
    got16 = our_logits(torch.bfloat16)
    ref32, got32 = hf_logits(torch.float32), our_logits(torch.float32)

    def worst(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
        return max(rel(x, y) for x, y in zip(a, b, strict=True))

    return dict(
        prefill=rel(got16[0], ref16[0]),
        decode=rel(got16[1], ref16[1]),
        hf16_f32=worst(ref16, ref32),
        ours16_f32=worst(got16, ref32),
        ours32_f32=worst(got32, ref32),
        top1=(got16[1].argmax(-1) == ref16[1].argmax(-1)).float().mean().item(),
    )


def passes(name: str, r: dict, tol: float) -> bool:
    if name in ROUTED:
        bound = max(tol, ROUTED_SLACK * r["hf16_f32"])
        return r["ours32_f32"] < FP32_TOL and r["ours16_f32"] <= bound
    return r["prefill"] < tol and r["decode"] < tol


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative error allowed")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    import transformers

    cuda = args.device.startswith("cuda")
    env = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=torch.cuda.get_device_name() if cuda else args.device,
        date=datetime.date.today().isoformat(),
    )
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    cols = ("prefill", "decode", "hf16_f32", "ours16_f32", "ours32_f32")
    header = f"{'case':20} " + " ".join(f"{c:>10}" for c in cols) + f" {'top1':>6}"
    print(header + "\n" + "-" * len(header))
    results, failed = [], []
    for name in args.cases:
        model_type, overrides = CASES[name]
        r = run_case(model_type, overrides, args.device, args.quick)
        r = {"case": name, **r, "ok": passes(name, r, args.tol)}
        results.append(r)
        if not r["ok"]:
            failed.append(name)
        row = f"{name:20} " + " ".join(f"{r[c]:10.2e}" for c in cols) + f" {r['top1']:6.1%}"
        print(row + ("" if r["ok"] else "  FAIL"), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dict(env=env, tol=args.tol, results=results), indent=2))
    summary = f"{len(results) - len(failed)}/{len(results)} passed (tol {args.tol:g})"
    print(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
