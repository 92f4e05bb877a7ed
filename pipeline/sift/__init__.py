"""SIFT: score candidates at an early exit, keep the ones with the largest approximate loss.

- `scoring`: per-sample losses from the model's first k blocks and its own MLM head (no gradients);
- `policies`: every selection policy as a small pure function `scores -> kept indices`, in a table;
- `hook`: the stateful pre-step hook (`Selector`) that ties scoring and a policy to the engine;
- `agreement`: how well an exit-layer ranking matches the exact one (the probe's metrics).
"""
