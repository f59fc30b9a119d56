"""Planning: what each chain does in backward, decided from measured costs.

In: the ``ChainAnalysis``. Out: ``ChainPlan`` (checkpoint segments: ``plan_checkpoint`` for the
fixed schedules, ``plan_budget`` for the budget planner) and ``ReversiblePlan``
(``plan_reversible``). The budget planner measures blocks (``profile_blocks``, ``profile_stem``,
``profile_step``, FLOPs by ``count_flops``), builds each block's options (``save_ops_menu``,
``chain_costs``) and solves them (``solve_schedule``); ``recompute_share`` prices recompute as a
share of one forward. Imports capture and analysis.
"""
