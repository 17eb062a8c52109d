"""patcher: edit transformer checkpoints along residual-stream directions, streaming, without PyTorch."""

__version__ = "0.1.0"
