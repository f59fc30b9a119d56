"""torch.compile: revified models compile and train like eager.

revify's runtime (segment and chain heads and relays) is opaque to dynamo
(``torch.compiler.disable``): the blocks of a converted chain run eagerly, in
forward and in the recompute, so both use the same kernels and the same
random stream; everything around the chains (embeddings, head, loss) is
compiled. Expected: with ``aot_eager`` outputs and gradients equal eager bit
for bit (dropout on); with ``inductor`` (fused kernels, dropout off) within
1e-5 relative per parameter.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch import nn

import revify
from zoo import PreLNBlock

GRAD_RTOL = {"aot_eager": 0.0, "inductor": 1e-5}

pytestmark = pytest.mark.usefixtures("one_thread")



class Encoder(nn.Module):
    def __init__(self, dim: int, n: int, p: float):
        super().__init__()
        self.layers = nn.ModuleList(PreLNBlock(dim, 2, p) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Net(nn.Module):
    """Blocks looped over in a child module, as in transformers: the root's graph compiles around it."""

    def __init__(self, vocab=50, dim=16, n=4, seq=8, p=0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.drop = nn.Dropout(p)
        self.encoder = Encoder(dim, n, p)
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.drop(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        return self.head(self.ln_f(self.encoder(x)))


def _ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 50, (2, 8))


def _converted(strategy: str, p: float) -> nn.Module:
    torch.manual_seed(0)
    model = Net(p=p).train()
    if strategy == "checkpoint":
        return revify.revify(model, (_ids(),), strategy="checkpoint", schedule="sqrt(n)", strict=True)
    rmodel = revify.revify(model, (_ids(),), strategy="reversible", coupling="meft1", strict=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, q in rmodel.named_parameters():
            if "revify_adapter" in name:
                q.normal_(0, 0.05)
    return rmodel


def _step(fn, model: nn.Module) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(5)
    out = fn(_ids())
    out.float().pow(2).mean().backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    for q in model.parameters():
        q.grad = None
    return out.detach(), grads


@functools.cache
def _inductor_missing() -> str | None:
    """Why inductor cannot compile here (no C++ compiler, ...), or None."""
    try:
        torch.compile(lambda x: x.sin() + 1, backend="inductor")(torch.ones(3))
    except Exception as exc:  # any failure means: skip, with the reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        torch._dynamo.reset()
    return None


def _needs(backend: str) -> None:
    if backend == "inductor" and (why := _inductor_missing()):
        pytest.skip(f"inductor cannot compile on this machine ({why})")


@pytest.mark.parametrize("strategy", ["checkpoint", "reversible"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gradients_match_eager(backend, strategy):
    _needs(backend)
    # inductor draws dropout masks from its own generator in the compiled parts:
    # compare it with eager only without dropout (the next test covers dropout)
    rmodel = _converted(strategy, p=0.1 if backend == "aot_eager" else 0.0)
    out_eager, grads_eager = _step(rmodel, rmodel)
    torch._dynamo.reset()
    compiled = torch.compile(rmodel, backend=backend)
    for _ in range(2):  # the second call runs the cached graphs
        out, grads = _step(compiled, rmodel)
        assert grads.keys() == grads_eager.keys() and grads
        tol = GRAD_RTOL[backend]
        torch.testing.assert_close(out, out_eager, rtol=tol, atol=1e-6 if tol else 0.0)
        for k, ref in grads_eager.items():
            diff = (grads[k] - ref).norm().item()
            # an absolute floor for gradients that are zero in exact arithmetic (attention key bias)
            assert diff <= tol * ref.norm().item() + (1e-9 if tol else 0.0), (k, diff, ref.norm().item())
    torch._dynamo.reset()


@pytest.mark.parametrize("strategy", ["checkpoint", "reversible"])
def test_chains_are_graph_breaks_and_the_rest_compiles(strategy):
    rmodel = _converted(strategy, p=0.1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(rmodel)(_ids())
    torch._dynamo.reset()
    # the embeddings before the encoder and the head after it are compiled graphs
    assert explained.graph_count >= 2, explained
    compiled_ops = sum(len(ops) for ops in explained.ops_per_graph)
    assert compiled_ops >= 4, explained.ops_per_graph
    # every break is revify's runtime, nothing else
    assert explained.break_reasons, "expected a graph break at the converted chain"
    for reason in explained.break_reasons:
        assert "torch.compiler.disable" in reason.reason, reason.reason


def test_inductor_with_dropout_matches_stored_activation_reference():
    # with dropout on, inductor's masks differ from eager's, so compare the compiled
    # reversible runtime with the compiled reference mode (same architecture, all
    # activations stored): the chain's forward and its recompute must draw the same masks
    _needs("inductor")
    rmodel = _converted("reversible", p=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(rmodel, backend="inductor")
    out, grads = _step(compiled, rmodel)
    with revify.stored_activations(rmodel):
        out_ref, grads_ref = _step(compiled, rmodel)
    torch._dynamo.reset()
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ref.keys() and grads
    for k, ref in grads_ref.items():
        err = ((grads[k] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err <= 1e-4, (k, err)


def test_compiled_model_keeps_the_memory_saving():
    from revify.measure import measure_saved_bytes
    rmodel = _converted("reversible", p=0.0)

    def loss(out):
        return out.float().pow(2).mean()

    torch._dynamo.reset()
    compiled = torch.compile(rmodel, backend="aot_eager")
    saved_compiled, _ = measure_saved_bytes(compiled, (_ids(),), loss)
    with revify.stored_activations(rmodel):
        saved_stored, _ = measure_saved_bytes(rmodel, (_ids(),), loss)
    saved_eager, _ = measure_saved_bytes(rmodel, (_ids(),), loss)
    torch._dynamo.reset()
    assert saved_compiled == saved_eager < saved_stored
