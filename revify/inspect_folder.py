"""``revify inspect DIR`` on a converted folder: what was converted, with what, and what it saves.

A folder written by ``revify convert`` or ``revify.save`` records its plan
(``revify.json``). This reads it back the way ``revify.load`` does (so what
it prints is what loading gives: the same chains, segments and couplings,
checked against the architecture analysed now) and prints the plan with the
predictions recorded at conversion: the budget planner's predicted peak and
bytes kept, and its recompute in percent and ms of one model forward.

Before::

    out/revify.json  {"format_version": 1, "plan": {"chains": [...], "budget": {...}}, ...}

After::

    converted folder out (revify 0.1.0, torch 2.13.0; from transformers BertForSequenceClassification)
      example inputs: input_ids 2x128 int64, attention_mask 2x128 int64
      revify plan — strategy: checkpoint
        converted: 3 block(s) checkpointed, of 12 in 1 chain(s) ...
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

# what the plan summary reads of the budget planner's record (BudgetPlan)
_BUDGET_FIELDS = ("budget", "predicted_peak", "smallest_budget", "forward_s", "budget_for", "recompute_cost",
                  "predicted_recompute_flops", "predicted_recompute_s")


def _source_words(source: dict) -> str:
    kind = source.get("kind")
    if kind == "transformers":
        return f"transformers {source.get('architecture', '?')}"
    return str(source.get("arch") or source.get("class") or source.get("path") or kind or "unknown source")


def describe_folder(path: str | Path, *, verbose: bool = False, as_json: bool = False,
                    arch: str | None = None) -> str:
    """The recorded plan of a converted folder, as ``revify.load`` applies it (``CheckpointError`` if it cannot).

    ``arch``: for folders converted from a state dict with ``--arch`` (imports and runs that code)."""
    from revify.checkpoint_io import load, read_manifest
    from revify.example_inputs import InputSpec

    folder = Path(path)
    manifest = read_manifest(folder)
    rmodel = load(folder, arch=arch)  # re-analyses the architecture and applies the recorded plan, as a user's load does
    plan = rmodel.revify_plan
    budget = manifest.get("plan", {}).get("budget")
    if isinstance(budget, dict) and all(k in budget for k in _BUDGET_FIELDS):
        plan.budget = SimpleNamespace(**{k: budget[k] for k in _BUDGET_FIELDS}, pareto=[])
    if as_json:
        return json.dumps({k: manifest.get(k) for k in ("revify_version", "torch_version", "source", "strategy",
                                                        "options", "inputs", "plan")}, indent=1)
    inputs = InputSpec.from_json(manifest["inputs"]).describe()
    head = (f"converted folder {folder} (revify {manifest.get('revify_version', '?')}, torch "
            f"{manifest.get('torch_version', '?')}; from {_source_words(manifest.get('source', {}))})")
    lines = [head, f"  example inputs: {inputs}"]
    frozen = manifest.get("frozen") or []
    if frozen:
        lines.append(f"  frozen: {len(frozen)} parameter tensor(s) do not train (recorded)")
    lines += ["  " + ln for ln in plan.summary(verbose=verbose).splitlines()]
    lines.append("  (predictions recorded at conversion; `revify report` on the source measures the savings)")
    return "\n".join(lines)
