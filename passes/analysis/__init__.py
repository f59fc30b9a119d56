"""Analysis: which blocks are residual, which form chains, and what is legal to rewrite.

In: capture's ``CallTrace`` and block graphs. Out: ``ResidualSpine`` per block
(``find_residual_blocks``: ``y = x + f(x)`` found by dominators), a ``ChainAnalysis``
(``find_chains``: blocks fed one into the next, with ``Legality`` from ``check_legality`` and a
``StemInfo`` from ``find_stem``; the types in ``chain_types``, call-tree queries in ``call_tree``),
the residual adds of each fx region (``count_residual_adds``), and refusals for list-fed blocks
(``find_list_inputs``). Imports capture only.
"""
