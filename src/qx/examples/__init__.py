"""Example bounded contexts shipped with qx (used by ``qx demo``, the docs and benchmarks)."""
