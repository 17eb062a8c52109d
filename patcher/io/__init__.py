"""Checkpoint I/O: the safetensors reader, the lazy checkpoint, the streaming atomic writer, manifests."""
