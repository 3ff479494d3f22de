#!/usr/bin/env python3
"""Tiny random OLMoE and Mixtral checkpoints and Hugging Face transformers' outputs on them: the
golden fixtures of `src/moe_lm` (tests/moe_lm.rs).

    python3 scripts/moe_fixtures.py --out DIR

writes, for each family (olmoe-tiny, mixtral-tiny):

  DIR/<family>/config.json            transformers' save_pretrained
  DIR/<family>/generation_config.json (idem, if transformers writes one)
  DIR/<family>/model.safetensors      f32 weights in the layout of the Hugging Face Hub checkpoints
                                      (per-expert tensors: OLMoE `mlp.experts.E.{gate,up,down}_proj`,
                                      Mixtral `block_sparse_moe.experts.E.w{1,2,3}` and
                                      `block_sparse_moe.gate`), checked by reloading it with
                                      from_pretrained and comparing the logits
  DIR/<family>/expected.safetensors   for one prompt of PROMPT_LEN random ids:
      ids            i64 (L,)
      logits         f32 (L, V)          the f32 model, eager attention
      logits_bf16    f32 (L, V)          the same weights cast to bf16 (logits stored as f32)
      router_probs   f32 (n_layers, L, E) softmax of the router logits, in f32 (as HF computes it)
      topk_experts   i64 (n_layers, L, k) the chosen experts, sorted ascending within each set
      greedy         i64 (16,)           greedy continuation with the KV cache (f32 model)

Needs torch and transformers 5.x (4.4x works too: the weights are written from the state dict in
either layout). Runs on a CPU in well under a minute. Deterministic for a given torch build.
"""
import argparse
import json
import os
import re
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import AutoModelForCausalLM

SEED = 1234
PROMPT_LEN = 320
GREEDY_NEW = 16
VOCAB = 512


def olmoe_config():
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,  # as in allenai/OLMoE-1B-7B-0924
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        clip_qkv=None,
        tie_word_embeddings=False,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=64,  # much shorter than the prompt: the window matters
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILIES = {
    "olmoe-tiny": ("olmoe", olmoe_config, "OlmoeForCausalLM"),
    "mixtral-tiny": ("mixtral", mixtral_config, "MixtralForCausalLM"),
}


def n_experts(cfg):
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts


def hub_layout(state, family):
    """The model's state dict with the names and per-expert tensors of the Hub checkpoints.

    transformers 5 keeps the experts of a layer fused at run time (`mlp.experts.gate_up_proj`
    (E, 2I, H) = gate rows then up rows, `mlp.experts.down_proj` (E, H, I)) and Mixtral's router as
    `mlp.gate`; 4.x keeps the Hub names. Both map to the Hub layout here."""
    out = {}
    fused = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
    for name, t in state.items():
        t = t.detach().to(torch.float32).contiguous()
        m = fused.match(name)
        if m:
            prefix, which = m.groups()
            moe = prefix + (".mlp" if family == "olmoe" else ".block_sparse_moe")
            for e in range(t.shape[0]):
                if which == "gate_up_proj":
                    inter = t.shape[1] // 2
                    gate, up = t[e, :inter].contiguous(), t[e, inter:].contiguous()
                    if family == "olmoe":
                        out[f"{moe}.experts.{e}.gate_proj.weight"] = gate
                        out[f"{moe}.experts.{e}.up_proj.weight"] = up
                    else:
                        out[f"{moe}.experts.{e}.w1.weight"] = gate
                        out[f"{moe}.experts.{e}.w3.weight"] = up
                else:
                    key = "down_proj" if family == "olmoe" else "w2"
                    out[f"{moe}.experts.{e}.{key}.weight"] = t[e].contiguous()
            continue
        if family == "mixtral":
            name = re.sub(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$", r"\1.block_sparse_moe.gate.weight", name)
        out[name] = t
    return out


def gates(model):
    """The router module of every layer (`mlp.gate` in 5.x and OLMoE, `block_sparse_moe.gate` in
    Mixtral under 4.x)."""
    found = []
    for layer in model.model.layers:
        moe = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
        found.append(moe.gate)
    return found


@torch.no_grad()
def run(model, ids, k):
    """Logits (L, V) f32, router probabilities (n_layers, L, E) f32 and top-k sets (n_layers, L, k)."""
    captured = []

    def hook(module, args, kwargs, _output):
        x = args[0] if args else kwargs["hidden_states"]
        h = x.reshape(-1, x.shape[-1])
        logits = F.linear(h, module.weight)  # as HF: linear in the model's dtype, softmax in f32
        captured.append(F.softmax(logits, dim=-1, dtype=torch.float32))

    handles = [g.register_forward_hook(hook, with_kwargs=True) for g in gates(model)]
    try:
        out = model(input_ids=ids[None], use_cache=False, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    probs = torch.stack(captured)  # (n_layers, L, E)
    # cross-check with what transformers itself reports (logits in 4.x, probabilities in some 5.x)
    reported = getattr(out, "router_logits", None)
    if reported:
        for layer, r in enumerate(reported):
            r = r.reshape(-1, r.shape[-1]).float()
            is_prob = bool((r >= 0).all()) and torch.allclose(r.sum(-1), torch.ones(r.shape[0]), atol=1e-4)
            p = r if is_prob else F.softmax(r, dim=-1)
            diff = (p - probs[layer]).abs().max().item()
            assert diff < 1e-5, f"layer {layer}: hooked router probabilities differ from HF's by {diff}"
    top = torch.topk(probs, k, dim=-1)
    experts = torch.sort(top.indices, dim=-1).values.to(torch.int64)
    # margin between the k-th and the (k+1)-th probability: a near tie would make the fixture fragile
    sorted_p = torch.sort(probs, dim=-1, descending=True).values
    margin = (sorted_p[..., k - 1] - sorted_p[..., k]).min().item()
    return out.logits[0].float(), probs, experts, margin


@torch.no_grad()
def greedy(model, ids, n):
    """n greedy tokens after `ids`: the prompt in one call, then one token per call with the cache
    (positions passed explicitly); checked against argmaxes of one uncached forward."""
    out = model(input_ids=ids[None], use_cache=True)
    past = out.past_key_values
    nxt = out.logits[0, -1].argmax()
    got = [int(nxt)]
    for i in range(n - 1):
        pos = torch.tensor([ids.shape[0] + i])
        out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True,
                    cache_position=pos, position_ids=pos[None])
        past = out.past_key_values
        nxt = out.logits[0, -1].argmax()
        got.append(int(nxt))
    got = torch.tensor(got, dtype=torch.int64)
    full = model(input_ids=torch.cat([ids, got[:-1]])[None], use_cache=False).logits[0]
    assert torch.equal(full[ids.shape[0] - 1:].argmax(-1), got), "cached greedy differs from the uncached argmax"
    return got


def instantiate(cls, cfg):
    """The model with eager attention and, where transformers has the switch, eager experts (the
    readable reference loops)."""
    try:
        return cls._from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    except (TypeError, ValueError):
        return cls._from_config(cfg, attn_implementation="eager")


def reload(dest):
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    try:
        return AutoModelForCausalLM.from_pretrained(dest, experts_implementation="eager", **kw)
    except (TypeError, ValueError):
        return AutoModelForCausalLM.from_pretrained(dest, **kw)


def build(folder, out_root):
    family, make_config, cls_name = FAMILIES[folder]
    torch.manual_seed(SEED)
    cfg = make_config()
    cls = getattr(transformers, cls_name)
    model = instantiate(cls, cfg).to(torch.float32).eval()
    # a router with spread-out logits, so that no top-k set is decided by a near tie
    with torch.no_grad():
        for g in gates(model):
            g.weight.normal_(0.0, 0.5)
    k = cfg.num_experts_per_tok

    dest = os.path.join(out_root, folder)
    os.makedirs(dest, exist_ok=True)
    try:
        model.save_pretrained(dest)
    except Exception as e:  # the weights are written below anyway; config.json is what matters
        print(f"  save_pretrained failed ({type(e).__name__}: {e}); writing config.json alone")
        model.config.save_pretrained(dest)
    for f in os.listdir(dest):  # replace whatever weight files save_pretrained wrote
        if f.endswith(".safetensors") or f.endswith(".bin") or f.endswith(".index.json"):
            os.remove(os.path.join(dest, f))
    weights = hub_layout(model.state_dict(), family)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})

    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=g, dtype=torch.int64)

    logits, probs, experts, margin = run(model, ids, k)
    continuation = greedy(model, ids, GREEDY_NEW)

    # the written Hub layout loads back into the same model
    again = reload(dest).eval()
    logits_again, _, _, _ = run(again, ids, k)
    reload_diff = (logits_again - logits).abs().max().item()
    assert reload_diff < 1e-6, f"{folder}: reloaded checkpoint differs by {reload_diff}"

    window = getattr(cfg, "sliding_window", None)
    if family == "mixtral" and window:
        # transformers really applies the window: without it the late positions change
        wide_cfg = make_config()
        wide_cfg.sliding_window = None
        no_window = instantiate(cls, wide_cfg)
        no_window.load_state_dict(model.state_dict())
        wide, _, _, _ = run(no_window.to(torch.float32).eval(), ids, k)
        early = (wide[:window] - logits[:window]).abs().max().item()
        late = (wide[window:] - logits[window:]).abs().max().item()
        assert early < 1e-5 and late > 1e-3, f"sliding window {window}: early diff {early}, late diff {late}"
        print(f"  sliding window {window} checked: early diff {early:.1e}, late diff {late:.1e}")

    model_bf16 = model.to(torch.bfloat16)
    logits_bf16, _, _, _ = run(model_bf16, ids, k)

    expected = {
        "ids": ids,
        "logits": logits.contiguous(),
        "logits_bf16": logits_bf16.float().contiguous(),
        "router_probs": probs.contiguous(),
        "topk_experts": experts.contiguous(),
        "greedy": continuation,
    }
    save_file(expected, os.path.join(dest, "expected.safetensors"), metadata={"format": "pt"})

    size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
    print(f"{dest}: {cls_name}, {len(weights)} tensors, {size / 1e6:.2f} MB")
    for f in sorted(os.listdir(dest)):
        print(f"  {f}: {os.path.getsize(os.path.join(dest, f))} bytes")
    print(f"  ids {tuple(ids.shape)}, logits {tuple(logits.shape)}, router_probs {tuple(probs.shape)}, "
          f"topk_experts {tuple(experts.shape)}, greedy {continuation.tolist()}")
    print(f"  smallest top-{k} margin {margin:.3e}; max |logits_bf16 - logits| "
          f"{(logits_bf16.float() - logits).abs().max().item():.3e}; reload diff {reload_diff}")
    with open(os.path.join(dest, "config.json")) as f:
        c = json.load(f)
    print(f"  config.json: model_type={c.get('model_type')}, keys={sorted(c)}")
    print(f"  weight names (first 12): {sorted(weights)[:12]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder that receives olmoe-tiny/ and mixtral-tiny/")
    p.add_argument("--only", choices=sorted(FAMILIES), help="build just this family")
    a = p.parse_args()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for folder in sorted(FAMILIES):
        if a.only and folder != a.only:
            continue
        build(folder, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
