"""`patcher search`: multi-objective search over ablations, evaluated in the forward pass."""
