"""Scheduling policy: pure modules, one concept each, with no I/O and ``now`` passed in.

``config`` (the YAML file), ``order`` (QoS classes, priorities, aging), ``fairshare`` (decayed
usage), ``quota`` (concurrency and pending caps), ``token_bucket`` (rate limiters and token leases),
``budget`` (CPU/GPU-hour budgets), and ``room`` (the waiting room that combines them).
"""
