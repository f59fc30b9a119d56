"""Analysis and rewrite passes of revify, one pass per module.

Pipeline: record_calls → capture → find_residual_blocks → find_chains →
check_legality → plan_checkpoint → rewrite_checkpoint; for the reversible
strategy plan_reversible → split_sublayers (MEFT3) → rewrite_reversible
→ calibrate_reversible.
"""
