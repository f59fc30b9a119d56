"""A converted module inside the training stacks users run (Trainer, TRL, accelerate, PEFT).

Those stacks talk to the model through a few methods of its class:
``save_pretrained`` (``Trainer.save_model``, every ``checkpoint-N``, TRL,
``accelerator.unwrap_model(m).save_pretrained``) and ``gradient_checkpointing_enable`` /
``activation_checkpointing_enable`` (``TrainingArguments(gradient_checkpointing=True)``).
``install`` puts a small callable object on the converted module itself (an
instance attribute; the class and the original model are untouched) for each
of them.

Before (``rmodel = revify.revify(model, inputs)``)::

    rmodel.save_pretrained(d)                 the class's: d/config.json, d/model.safetensors
    rmodel.gradient_checkpointing_enable()    every block recomputed again, on top of revify's plan

After (``install(rmodel, inputs)``, done by ``revify.api.convert``)::

    rmodel.save_pretrained(d)                 the same files, and d/revify.json: revify.load(d) rebuilds it
    rmodel.gradient_checkpointing_enable()    warns once and leaves revify's plan the only recompute

PEFT: ``peft_parameters`` names the parameters PEFT added (LoRA, IA3,
prompt vectors, ``modules_to_save`` copies), which ``freeze_backbone`` keeps
trainable. A ``PeftModel``'s own ``save_pretrained`` still writes only the
PEFT adapter (for a reversible model it warns that revify's adapters are not
in it); ``revify.save`` writes the whole converted model.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from revify.example_inputs import InputSpec
from revify.manifest import MANIFEST, ConversionRecord, describe_module, manifest_of, options_from_plan
from revify.passes.capture.peft_parameters import is_peft_model, peft_parameters

_RECOMPUTE_FLAGS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")


def peft_note(rmodel: nn.Module) -> str | None:
    """What the plan says about PEFT parameters: how many there are and that they still train."""
    ids = peft_parameters(rmodel)
    if not ids:
        return None
    names = [n for n, p in rmodel.named_parameters() if id(p) in ids]
    trainable = [n for n, p in rmodel.named_parameters() if id(p) in ids and p.requires_grad]
    kinds = sorted({_kind(n) for n in names})
    return (f"PEFT: {len(trainable)} of {len(names)} PEFT parameter(s) trainable ({', '.join(kinds)}); "
            "freeze_backbone freezes only pretrained weights")


def _kind(name: str) -> str:
    """``...query.lora_A.default.weight`` → ``lora_A``: the PEFT part a parameter belongs to."""
    for part in name.split("."):
        if part.startswith(("lora_", "ia3_", "prompt_encoder", "modules_to_save", "token_adapter", "vera_",
                            "oft_", "boft_", "hada_", "lokr_", "ln_tuning")):
            return part
    return name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name


class SavePretrained:
    """``rmodel.save_pretrained``: the class's own, then ``revify.json`` beside it (main process only).

    The Hugging Face files stay readable by plain ``from_pretrained`` (the
    backbone; revify's adapters are reported as unexpected keys);
    ``revify.load(folder)`` rebuilds the converted module, adapters and
    trainable set included.
    """

    def __init__(self, module: nn.Module, inputs: InputSpec, training: bool):
        self.module, self.inputs, self.training = module, inputs, training

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        result = type(self.module).save_pretrained(self.module, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):  # other ranks of a distributed run write nothing
            write_manifest(self.module, Path(save_directory), self.inputs, self.training)
        return result


class PeftSavePretrained:
    """A reversible ``PeftModel``'s ``save_pretrained``: PEFT's own (the PEFT adapter only), and one warning.

    revify's coupling adapters are not PEFT parameters, so the PEFT adapter
    files do not hold them; ``revify.save`` writes the whole converted model.
    """

    def __init__(self, module: nn.Module):
        self.module, self.warned = module, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = type(self.module).save_pretrained(self.module, *args, **kwargs)
        if not self.warned:
            self.warned = True
            n = sum(1 for name, _ in self.module.named_parameters() if "revify_adapter" in name)
            warnings.warn(f"revify: the PEFT adapter files hold only PEFT's parameters, not revify's {n} coupling "
                          "adapter tensor(s); revify.save(rmodel, folder, example_inputs) writes the whole "
                          "converted model and revify.load(folder, model=a fresh PeftModel) restores it",
                          stacklevel=2)
        return result


def _weights_file(folder: Path) -> str | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return name
    return None


def write_manifest(rmodel: nn.Module, folder: Path, inputs: InputSpec, training: bool) -> None:
    """Write ``folder/revify.json`` for the Hugging Face files ``save_pretrained`` just wrote there."""
    weights = _weights_file(folder)
    if weights is None:  # e.g. safe_serialization=False: revify.load reads safetensors only
        warnings.warn(f"revify: {folder} holds no model.safetensors; no {MANIFEST} written, so revify.load "
                      "cannot rebuild this conversion from it (save with safetensors)", stacklevel=3)
        return
    record = getattr(rmodel, "_revify_record", None)
    if record is None:
        record = ConversionRecord(describe_module(rmodel), inputs, options_from_plan(rmodel.revify_plan), training)
    manifest = manifest_of(rmodel, record)
    manifest["weights"] = weights
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)  # a reader never sees half a manifest


class KeepRevifyRecompute:
    """``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` on a converted module.

    revify's plan already decides what each block keeps and recomputes; the
    Hugging Face flag would checkpoint every block again on top of it (a meft1
    block ran three times per step, a block the planner chose to keep was
    recomputed anyway). The flag is left off, with one warning. A module
    revify did not change at all passes the call to its class.
    """

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name, self.warned = module, name, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plan = getattr(self.module, "revify_plan", None)
        if plan is None or not plan.converted:
            cls = type(self.module)
            if callable(getattr(cls, self.name, None)):
                return getattr(cls, self.name)(self.module, *args, **kwargs)
            # a PeftModel forwards unknown attributes to the model it wraps
            return cls.__getattr__(self.module, self.name)(*args, **kwargs)
        if not self.warned:
            self.warned = True
            warnings.warn(f"revify: {self.name}() ignored: this module already recomputes activations as its "
                          "revify plan says (rmodel.revify_plan); checkpointing every block on top would "
                          "recompute them twice", stacklevel=2)
        return None


@contextlib.contextmanager
def hf_checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Analyse and measure blocks as they run without Hugging Face checkpointing; restore the flags after.

    With the flag on, every block measured would already recompute itself,
    and the budget planner would see almost nothing worth checkpointing.
    """
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in on:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in on:
            m.gradient_checkpointing = True


def disable_stacked_checkpointing(rmodel: nn.Module) -> list[str]:
    """Turn off Hugging Face checkpointing that was on before conversion, on the copy only.

    Returns the paths of the modules whose flag was on.
    """
    turned_off = []
    for path, m in rmodel.named_modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False  # the copy's own __dict__: the original keeps its flag
            turned_off.append(path)
    return turned_off


def already_converted(model: nn.Module) -> str | None:
    """Where ``model`` runs a forward revify installed (it was returned by ``revify.revify``), else None."""
    for path, m in model.named_modules():
        if getattr(m.__dict__.get("forward"), "revify_installed", False):
            return f"{path or '<root>'} runs a revify forward"
    return None


def install(rmodel: nn.Module, example_inputs: Any) -> None:
    """Put ``SavePretrained`` and ``KeepRevifyRecompute`` on a converted module, and note PEFT in its plan."""
    plan = rmodel.revify_plan
    note = peft_note(rmodel)
    if note is not None and plan.converted:
        plan.notes.append(note)
    if plan.converted:
        stacked = disable_stacked_checkpointing(rmodel)
        if stacked:
            plan.notes.append(f"Hugging Face gradient checkpointing was on ({len(stacked)} module(s)); turned off "
                              "on the converted module: revify's plan is the only recompute")
    for name in _RECOMPUTE_FLAGS:
        if callable(getattr(rmodel, name, None)):  # the class's, or the wrapped model's under a PeftModel
            rmodel.__dict__[name] = KeepRevifyRecompute(rmodel, name)
    if is_peft_model(rmodel):  # its save_pretrained writes only the PEFT adapter: kept so, with a warning
        if any("revify_adapter" in n for n, _ in rmodel.named_parameters()):
            rmodel.__dict__["save_pretrained"] = PeftSavePretrained(rmodel)
        return
    if not callable(getattr(type(rmodel), "save_pretrained", None)):
        return
    try:
        inputs = InputSpec.from_example(example_inputs)
    except ValueError:
        return  # inputs revify cannot record: save_pretrained stays the class's, revify.save explains why
    rmodel.__dict__["save_pretrained"] = SavePretrained(rmodel, inputs, rmodel.training)
