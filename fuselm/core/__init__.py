"""The state every layer shares, below the engine, the runner and the speculator.

A request's state (request.py), the KV block pool that requests own blocks of (kv_cache.py),
the scheduler's output that the model runner executes (scheduler_output.py) and the measured
step costs (step_cost.py). Nothing here imports fuselm.engine, fuselm.runner or fuselm.spec, so
each of those can import it without a cycle.
"""
