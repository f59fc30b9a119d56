"""The dataclasses analysis hands to planning: blocks, chains, their stems, and refusals.

They live apart from the passes that fill them (``find_chains`` makes ``Chain``s, ``find_stem``
sets each one's ``StemInfo``) so that neither pass imports the other; ``find_chains`` still
names them for the modules that import them from there.
"""
from __future__ import annotations

from dataclasses import dataclass

from revify.passes.analysis.check_legality import Legality
from revify.passes.capture.record_calls import CallRecord


@dataclass(frozen=True)
class StemInfo:
    """The call that produced a chain's first hidden input (``find_stem``)."""

    path: str
    module_type: str
    call: CallRecord


@dataclass(frozen=True)
class BlockInfo:
    path: str
    module_type: str
    call: CallRecord
    engine: str  # how its graph was captured: fx, export or opaque
    residual: str  # description of the residual structure found
    sublayers: int
    legality: Legality
    mutated_buffers: tuple[str, ...] = ()  # qualified names of buffers updated in forward


@dataclass(frozen=True)
class Chain:
    parent: str
    blocks: tuple[BlockInfo, ...]
    stem: StemInfo | None = None  # what produced the first block's input (``find_stem``)

    @property
    def side_groups(self) -> tuple[int, ...]:
        """Per block, the number of its side inputs (mask, position embeddings) among the chain's distinct ones."""
        seen: dict[tuple, int] = {}
        return tuple(seen.setdefault(b.call.side_signature, len(seen)) for b in self.blocks)

    @property
    def side_inputs_from_blocks(self) -> tuple[int, ...]:
        """Blocks whose side inputs include a tensor an earlier block of the chain computed and returned
        (T5: blocks 1… receive the position bias block 0 computes)."""
        made: set[int] = set()
        fed = []
        for k, b in enumerate(self.blocks):
            if made & set(_tensor_ids(b.call.side_signature)):
                fed.append(k)
            made.update(b.call.computed_extra_ids)
        return tuple(fed)

    def parts_with_same_side_inputs(self) -> list[Chain]:
        """Maximal runs of at least two blocks that receive the same side inputs, as chains (the whole
        chain when all do, or when no such run exists, so that its refusal names the reason)."""
        groups = self.side_groups
        if len(set(groups)) <= 1:
            return [self]
        parts, start = [], 0
        for k in range(1, len(groups) + 1):
            if k == len(groups) or groups[k] != groups[start]:
                if k - start >= 2:
                    parts.append(Chain(self.parent, self.blocks[start:k], self.stem if start == 0 else None))
                start = k
        return parts or [self]

    @property
    def shared(self) -> bool:
        """Whether one module is several blocks of the chain (called several times per forward)."""
        return len({b.path for b in self.blocks}) < len(self.blocks)


@dataclass(frozen=True)
class Rejection:
    where: str
    reason: str


@dataclass(frozen=True)
class ChainAnalysis:
    chains: tuple[Chain, ...]
    rejections: tuple[Rejection, ...]

    @property
    def found(self) -> tuple[int, int]:
        """(blocks, chains) found: what a plan's headline counts its conversions against."""
        return sum(len(c.blocks) for c in self.chains), len(self.chains)


def _tensor_ids(signature: tuple) -> list[int]:
    """The ids of the tensors in a ``side_signature`` (tuples of rotary cos/sin included)."""
    ids = []
    for entry in signature:
        kind, ident = entry[-2], entry[-1]
        if kind == "tensor":
            ids.append(ident)
        elif kind in ("tuple", "object") and isinstance(ident, tuple):
            ids += _tensor_ids(ident)
    return ids
