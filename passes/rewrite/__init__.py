"""Rewrite: install the plan on the model, keeping its weights and call signature.

In: a ``Plan``'s ``ChainPlan``s and ``ReversiblePlan``s. Out: the same module with revify's
forwards installed on its blocks (``rewrite_checkpoint``, ``rewrite_reversible``; meft3 blocks
split into two halves by ``split_sublayers``), and reversible anchors placed from measured
reconstruction error (``calibrate_reversible``). The code that then runs inside a training step
lives in ``revify.runtime``. Imports capture, analysis and planning.
"""
