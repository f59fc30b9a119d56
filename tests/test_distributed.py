"""DDP and FSDP2 on CPU (gloo, 2 processes): revified models train like a single process.

Each test spawns two processes that convert the same model, wrap it
(``DistributedDataParallel(model)`` with default settings, or FSDP2's
``fully_shard`` on every block and then the root), and take a few SGD steps
on their half of each batch. The single-process run on the concatenated
batch must give the same gradients and parameters. That comparison is valid
because dropout is off (p = 0) and the loss is a mean over equal halves, so
the all-reduced (averaged) gradient is the full-batch gradient; what remains
is rounding from different batch shapes and reduction order, hence the
tolerances (1e-5 relative for checkpointing, 1e-4 — the reconstruction
tolerance — for reversible chains).

The "stem" model has its embeddings in one module, which the planner
recomputes with the first segment (``runtime/checkpoint_stem``); its
parameters stay with the root when only blocks are sharded.

The processes rendezvous through a file in ``tmp_path``: no port to pick.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revify
from zoo import EmbeddedTransformer, PreLNTransformer

WORLD = 2
STEPS = 3
TOL = {"checkpoint": 1e-5, "stem": 1e-5, "reversible": 1e-4}


pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is not available")]


def _converted(strategy: str) -> nn.Module:
    """The same converted model in every process: seeded, dropout off, adapters nonzero."""
    torch.manual_seed(0)
    model = (EmbeddedTransformer if strategy == "stem" else PreLNTransformer)(p=0.0, n_blocks=4).train()
    example = (torch.randint(0, 50, (2, 16)),)
    if strategy == "checkpoint":
        # two segments of two blocks: the relays (blocks run by their segment's head) are exercised
        return revify.revify(model, example, strategy="checkpoint", schedule="sqrt(n)", strict=True)
    if strategy == "stem":
        # the least kept bytes: the embeddings are recomputed with the first segment (checkpoint_stem),
        # their parameters used again in backward
        rmodel = revify.revify(model, example, budget_for="activations", recompute_cost="flops", strict=True)
        assert rmodel.revify_plan.chains[0].stem == "embed", rmodel.revify_plan.chains[0]
        return rmodel
    rmodel = revify.revify(model, example, strategy="reversible", coupling="meft1", strict=True)
    torch.manual_seed(3)
    with torch.no_grad():  # zero-initialised adapters would give zero gradients to most of them
        for name, p in rmodel.named_parameters():
            if "revify_adapter" in name:
                p.normal_(0, 0.05)
    return rmodel


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(10)
    return [torch.randint(0, 50, (2 * WORLD, 16)) for _ in range(STEPS)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(model: nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict:
    """SGD steps; returns every step's gradients and the parameters after the last step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    grads = []
    for ids in batches:
        model(ids).float().pow(2).mean().backward()
        grads.append({n: _full(p.grad) for n, p in zip(names, model.parameters()) if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"grads": grads, "params": {n: _full(p) for n, p in zip(names, model.parameters())}}


def _worker(rank: int, wrapper: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for strategy in ("checkpoint", "stem", "reversible"):
            model = _converted(strategy)
            names = [n for n, _ in model.named_parameters()]
            if wrapper == "ddp":
                model = nn.parallel.DistributedDataParallel(model)  # default settings
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                mesh = init_device_mesh("cpu", (WORLD,))
                for block in model.blocks:  # the stem (embed) stays with the root's parameters
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            half = slice(rank * 2, rank * 2 + 2)
            results[strategy] = _train(model, [b[half] for b in _batches()], names)
            if strategy == "stem":  # the embeddings were rebuilt in backward, not kept
                inner = model.module if wrapper == "ddp" else model
                results[strategy]["stem_uses"] = inner.embed.forward.owner.recipe_uses
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing the process group down. Seen in a suite run: the DDP
    # Reducer's destructor joined gloo's run-loop thread while holding the GIL, and
    # that thread was waiting for the GIL to release a completed work's thread-local
    # state (the checkpoint's saved-tensor hooks), so rank 0 hung after writing its
    # results. The results are on disk and the process is about to end anyway.
    os._exit(0)


def _spawn(wrapper: str, tmp_path, timeout_s: float = 420.0) -> dict:
    # ~10 s on an idle machine; the limit only turns a hang into a failure (CI shares 2 cores)
    out = str(tmp_path / "rank0.pt")
    ctx = mp.spawn(_worker, (wrapper, str(tmp_path / "store"), out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises if a process failed
            if time.monotonic() > deadline:
                pytest.fail(f"{wrapper}: the two processes did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return torch.load(out, weights_only=True)


def _assert_close(got: dict, ref: dict, tol: float, what: str) -> None:
    assert got.keys() == ref.keys(), (what, got.keys() ^ ref.keys())
    for k in ref:
        err = ((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item()
        assert err <= tol or (got[k] - ref[k]).abs().max() < 1e-9, (what, k, err)


def _check_against_single_process(results: dict) -> None:
    for strategy, got in results.items():
        model = _converted(strategy)
        ref = _train(model, _batches(), [n for n, _ in model.named_parameters()])
        assert ref["grads"][0], f"{strategy}: nothing trainable"
        for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
            _assert_close(g, r, TOL[strategy], f"{strategy} gradients, step {step}")
        _assert_close(got["params"], ref["params"], TOL[strategy], f"{strategy} parameters after {STEPS} steps")
        if strategy == "stem":
            assert got["stem_uses"] == STEPS, got["stem_uses"]
        if strategy == "reversible":  # frozen backbone: only adapters and the head train
            assert all("revify_adapter" in k or k.startswith(("ln_f", "head")) for k in ref["grads"][0])


def test_ddp_default_settings_match_single_process(tmp_path):
    _check_against_single_process(_spawn("ddp", tmp_path))


def test_fsdp2_each_block_sharded_matches_single_process(tmp_path):
    # revify runs later blocks of a segment or chain (and recomputes them in
    # backward) without their __call__, so FSDP2's unshard hooks do not fire
    # there: the runtime gathers them itself (revify/runtime/checkpoint_segment.py)
    _check_against_single_process(_spawn("fsdp2", tmp_path))


def test_frozen_backbone_meft1_has_no_dead_adapter():
    # meft1's chain output is the F stream, so the last block's G would write the
    # dropped stream: an adapter there never trains and DDP would all-reduce zeros for it
    rmodel = _converted("reversible")
    trainable = [n for n, p in rmodel.named_parameters() if p.requires_grad]
    assert not any(n.startswith("blocks.3.revify_adapter_g") for n in trainable)
    assert any(n.startswith("blocks.2.revify_adapter_g") for n in trainable)
    rmodel(_batches()[0]).float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in rmodel.named_parameters() if p.requires_grad), \
        [n for n, p in rmodel.named_parameters() if p.requires_grad and p.grad is None]
