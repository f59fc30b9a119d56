"""``revify.json``: what a saved folder records about a conversion, and how it is written.

The manifest names the source of the model, the inputs it was analysed on, the options asked
for, the frozen parameters and the plan's decisions (``saved_plan.plan_to_json``). Both writers
use it: ``revify.save`` (``checkpoint_io``) and the ``save_pretrained`` that ``training_stack``
installs on a converted module; ``revify.load`` reads it back. It sits below both, and below
``revify.api``, so that installing ``save_pretrained`` at conversion imports no loader.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revify.saved_plan import plan_to_json
from revify.sources import InputSpec

FORMAT_VERSION = 1  # bump when revify.json changes in a way older readers would misread
MANIFEST = "revify.json"
WEIGHTS = "model.safetensors"



@dataclass
class ConversionRecord:
    """How a converted module came to be, kept on it (``rmodel._revify_record``) for ``save``."""

    source: dict  # kind: transformers | arch | pickle | module, and where from
    inputs: InputSpec
    options: dict  # what the conversion was asked for (strategy, coupling, tolerance, ...)
    training: bool = True  # the mode the model was analysed in
    files: list[Path] = field(default_factory=list)  # non-weight files to carry over (config, tokenizer)


def _versions() -> dict:
    from revify import __version__

    out = {"revify_version": __version__, "torch_version": torch.__version__}
    if "transformers" in sys.modules:
        out["transformers_version"] = sys.modules["transformers"].__version__
    return out


def manifest_of(rmodel: nn.Module, record: ConversionRecord) -> dict:
    """``revify.json``'s content for ``rmodel``, as ``revify.save`` and ``save_pretrained`` write it."""
    plan = rmodel.revify_plan
    return {"format_version": FORMAT_VERSION, **_versions(), "source": record.source,
            "strategy": plan.strategy, "options": record.options, "inputs": record.inputs.to_json(),
            "training": record.training, "weights": WEIGHTS,
            "frozen": [n for n, p in rmodel.named_parameters() if not p.requires_grad],
            # a PeftModel wrapping a converted model: block paths as seen from the outer module
            "plan": prefix_plan_paths(plan_to_json(plan), plan_prefix(rmodel))}


def describe_module(rmodel: nn.Module) -> dict:
    """Where the module came from, as far as its class says: a transformers architecture or a class path."""
    cls = type(rmodel)
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(rmodel, transformers.PreTrainedModel) \
            and getattr(transformers, cls.__name__, None) is cls:
        return {"kind": "transformers", "architecture": cls.__name__}
    return {"kind": "module", "class": f"{cls.__module__}:{cls.__qualname__}"}


def options_from_plan(plan: Any) -> dict:
    """The options a plan was made with: strategy, schedule, and the reversible options if any."""
    options: dict[str, Any] = {"strategy": plan.strategy}
    if plan.chains:
        options["schedule"] = plan.chains[0].schedule
    if plan.reversible:
        options.update(dataclasses.asdict(plan.reversible[0].options))
    return options


def plan_prefix(module: nn.Module) -> str:
    """Where the converted module sits inside ``module``: ``""`` when it is ``module`` itself.

    ``get_peft_model(revify.revify(m, ...), config)`` wraps a converted model:
    its ``revify_plan`` (reached through PEFT's attribute forwarding) names
    blocks relative to the wrapped model, ``base_model.model.`` deeper here.
    """
    if "revify_plan" in module.__dict__:
        return ""
    for path, m in module.named_modules():
        if "revify_plan" in m.__dict__:
            return path + "."
    return ""


def prefix_plan_paths(plan_json: dict, prefix: str) -> dict:
    """The plan JSON (``saved_plan.plan_to_json``) with every module path under ``prefix``."""
    if not prefix:
        return plan_json
    for entry in plan_json.get("chains", []) + plan_json.get("reversible", []):
        entry["parent"] = prefix + entry["parent"] if entry.get("parent") else prefix.rstrip(".")
        entry["blocks"] = [prefix + b for b in entry["blocks"]]
        if isinstance(entry.get("extra", {}).get("stem"), str):
            entry["extra"]["stem"] = prefix + entry["extra"]["stem"]
    for rej in plan_json.get("rejections", []):
        rej["where"] = prefix + rej["where"]
    return plan_json
