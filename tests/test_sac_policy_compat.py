"""SaveListedOps under both selective-checkpointing protocols.

torch 2.13 asks the policy in the forward only and replays its answers in
recompute; torch <= 2.12 (the GPU machines' torch 2.11 among them) asks again in
recompute with ``ctx.is_recompute=True`` and hands back a kept output only where
that answer is "save". The policy must give the forward's answers again, or every
kept op is recomputed as well as kept.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.checkpoint import CheckpointPolicy

from revify.runtime.checkpoint_policy import SaveListedOps

OPS = [torch.ops.aten.mm.default, torch.ops.aten.relu.default, torch.ops.aten.mm.default,
       torch.ops.aten.add.Tensor, torch.ops.aten.mm.default]


def _answers(policy: SaveListedOps, recompute: bool) -> list[list[CheckpointPolicy]]:
    ctx = SimpleNamespace(is_recompute=recompute)
    out = []
    for block in range(2):
        policy.enter(block)
        out.append([policy(ctx, op) for op in OPS])
    policy.pause()
    assert policy(ctx, OPS[0]) == CheckpointPolicy.PREFER_RECOMPUTE  # between blocks: nobody's op
    return out


def test_recompute_answers_repeat_the_forward_answers():
    kept = (((0, str(OPS[0])), (4, str(OPS[4]))), ((2, str(OPS[2])), (3, "aten.relu.default")))
    policy = SaveListedOps(kept)
    forward = _answers(policy, recompute=False)
    save, again = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    # block 1 lists op 3 under another op's name: not kept (a different op sequence saves less, never wrong)
    assert forward == [[save, again, again, again, save], [again, again, save, again, again]]
    recorded = [list(r) for r in policy.recomputed]
    assert _answers(policy, recompute=True) == forward
    assert [list(r) for r in policy.recomputed] == recorded  # the forward's bookkeeping is left as it was
