"""Examples for spd_optax: run them from the repository root with `python -m`."""
