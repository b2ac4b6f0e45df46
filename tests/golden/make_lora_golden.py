"""Golden PEFT LoRA adapters and their outputs, for the jaxppo adapter parity tests (tests/models/test_peft.py).

Besides make_golden.py, the only file in the repo that imports torch (and peft). Run it with the
peer environment that has torch + transformers + peft (not jaxppo's), from the repo root:

    ~/.cache/jaxppo-peers/venv-trl/bin/pip install peft      # once
    ~/.cache/jaxppo-peers/venv-trl/bin/python tests/golden/make_lora_golden.py

For each committed base folder tests/golden/<arch> (llama, gpt2) it builds
`peft.get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=<every projection>))`,
sets every lora_A / lora_B to N(0, 0.1^2) from a fixed torch seed (PEFT starts B at zero, which
would test nothing), and writes under tests/golden/lora_<arch>/:
  adapter_config.json, adapter_model.safetensors   PEFT's own `save_pretrained` (README.md dropped)
  outputs.npz                                      input_ids, attention_mask (the base folder's
                                                   left-padded batch), `logits` of the PEFT model and
                                                   `merged_logits` of `merge_and_unload()`, [B, S, V]
Position ids are passed explicitly as clip(cumsum(mask) - 1, 0), jaxppo's convention.

Two more cases train modules in full beside the adapters (PEFT's `modules_to_save`), their copies
set to the base values + N(0, 0.1^2), written under tests/golden/lora_<arch>_saved/ (same files):
  llama  q_proj v_proj + modules_to_save ["model.norm", "embed_tokens", "lm_head"] (untied head;
         "model.norm", since PEFT matches names as suffixes and a bare "norm" also takes every
         input_layernorm / post_attention_layernorm)
  gpt2   c_attn + ["ln_f", "wpe", "wte", "lm_head"] with ensure_weight_tying=True (wte is tied to
         the LM head: PEFT trains one copy and saves it as both transformer.wte and lm_head)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}
RANK, ALPHA, STD = 4, 8, 0.1
SAVED = {"llama": (["q_proj", "v_proj"], ["model.norm", "embed_tokens", "lm_head"], {}),
         "gpt2": (["c_attn"], ["ln_f", "wpe", "wte", "lm_head"], {"ensure_weight_tying": True})}


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float().numpy()


def make(arch: str, seed: int, saved: bool = False) -> None:
    base_dir = os.path.join(HERE, arch)
    inputs = np.load(os.path.join(base_dir, "outputs.npz"))
    ids, mask = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    targets, modules_to_save, extra = SAVED[arch] if saved else (TARGETS[arch], None, {})
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                                            modules_to_save=modules_to_save, task_type="CAUSAL_LM",
                                            **extra)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):   # a tied copy is listed once
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(STD * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(STD * torch.randn(p.shape, generator=g))
    model.peft_config["default"].base_model_name_or_path = f"tests/golden/{arch}"   # not this machine's path
    out_dir = os.path.join(HERE, f"lora_{arch}_saved" if saved else f"lora_{arch}")
    model.save_pretrained(out_dir)
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    out = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
           "logits": logits(model, ids, mask)}
    # the folder just written, loaded back the way users load it, gives the same outputs
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      out_dir).eval()
    err = np.abs(logits(again, ids, mask) - out["logits"]).max()
    assert err < 1e-6, (arch, err)
    out["merged_logits"] = logits(model.merge_and_unload(), ids, mask)
    base_logits = inputs["logits"]
    keep = inputs["attention_mask"] > 0
    np.savez_compressed(os.path.join(out_dir, "outputs.npz"), **out)
    print(f"{os.path.basename(out_dir)}: {sorted(os.listdir(out_dir))}, |peft - merged| "
          f"{np.abs(out['logits'] - out['merged_logits'])[keep].max():.1e}, "
          f"|peft - base| {np.abs(out['logits'] - base_logits)[keep].max():.2f}")


def main() -> int:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}")
    for seed, arch in enumerate(TARGETS):
        make(arch, seed=200 + seed)
        make(arch, seed=300 + seed, saved=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
