"""Analysis and rewrite passes of revify, one pass per module.

Pipeline: record_calls → capture → find_residual_blocks → find_chains →
check_legality → find_stem; the budget planner profile_blocks (profile_stem)
→ profile_step → save_ops_menu → chain_costs → solve_schedule → plan_budget (fixed schedules in
plan_checkpoint) → rewrite_checkpoint; for the reversible strategy
plan_reversible → split_sublayers (MEFT3) → rewrite_reversible →
calibrate_reversible. Predictions: symbolic_inputs → fit_polynomial →
predict_memory, with fake_copy / fake_transformers for models too big to run.
"""
