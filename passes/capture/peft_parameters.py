"""Which parameters of a model PEFT added (LoRA, IA3, prompt vectors, ``modules_to_save`` copies).

A fact about the model as captured, read from PEFT's own layer types: the reversible rewrite
keeps these trainable when it freezes the backbone, and the training stack names them in the
plan. PEFT is never imported here: a model cannot hold PEFT layers unless its user imported it.

Before::

    PeftModel(BertModel(... query: lora.Linear(base_layer, lora_A, lora_B) ...))

After::

    {id(lora_A.default.weight), id(lora_B.default.weight), ...}
"""
from __future__ import annotations

import sys

from torch import nn


def is_peft_model(module: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def peft_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter PEFT added to ``model`` (empty if PEFT is not imported or not used).

    Adapter weights of tuner layers (``lora_A``, ``ia3_l``, ...), the trainable
    copies of auxiliary wrappers (``modules_to_save``, trainable tokens) and
    prompt-learning encoders. The wrapped pretrained weights are not included.
    """
    if "peft" not in sys.modules:  # a model cannot hold PEFT layers unless peft was imported
        return set()
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found: set[int] = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for name in m.adapter_layer_names:
                part = getattr(m, name, None)
                if isinstance(part, nn.Module):
                    found.update(id(p) for p in part.parameters())
        elif isinstance(m, AuxiliaryTrainingWrapper):
            original = {id(p) for p in m.original_module.parameters()} if hasattr(m, "original_module") else set()
            found.update(id(p) for p in m.parameters() if id(p) not in original)
        encoder = getattr(m, "prompt_encoder", None)
        if is_peft_model(m) and isinstance(encoder, nn.Module):
            found.update(id(p) for p in encoder.parameters())
    return found
