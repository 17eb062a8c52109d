"""Writing an ONNX model the way transformers.js reads it: the graph in `NAME.onnx`, the weights in
external data chunks `NAME.onnx_data`, `NAME.onnx_data_1`, ... each under 2 GB (a browser cannot hold
one ArrayBuffer past 2 GiB; transformers.js fetches `use_external_data_format` chunks by exactly these
names and mounts them under the same names, which are the `location`s the graph refers to).

Tensors are produced one at a time (lazy initializers decode, transform or quantize on demand), written
and released, so peak memory is about one tensor whatever the model size.
"""

import os
from pathlib import Path

import onnx_ir as ir

CHUNK_BYTES = 2_000_000_000  # < 2^31 - 1, the largest ArrayBuffer / fetch body browsers handle
INLINE_BYTES = 1024  # tiny constants (shapes, scalars) stay in the graph
ALIGN, ALIGN_FROM = 4096, 1 << 20  # page-aligned offsets let onnxruntime mmap large tensors, not copy them
FILE_MODE, DIR_MODE = 0o644, 0o755  # a web server running as another user must read every file


def chunk_names(file: str, count: int) -> list[str]:
    """transformers.js's names: `f_data`, `f_data_1`, `f_data_2`, ..."""
    return [f"{file}_data" + (f"_{i}" if i else "") for i in range(count)]


def write_model(model: ir.Model, path: Path, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Save `model` to `path` with its initializers in external data chunks beside it. Returns the
    chunk file names (what config.json's use_external_data_format counts). A single tensor larger
    than `chunk_bytes` gets a chunk of its own (a tensor cannot span files)."""
    path = Path(path)
    names: list[str] = []
    handle, offset = None, 0
    try:
        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            nbytes = tensor.nbytes
            if nbytes <= INLINE_BYTES:
                if isinstance(tensor, ir.LazyTensor):  # materialize the small ones now
                    value.const_value = ir.tensor(tensor.numpy(), name=value.name)
                continue
            start = -(-offset // ALIGN) * ALIGN if nbytes >= ALIGN_FROM else offset
            if handle is None or (start + nbytes > chunk_bytes and offset > 0):
                if handle is not None:
                    handle.close()
                names.append(chunk_names(path.name, len(names) + 1)[-1])
                handle = open(path.parent / names[-1], "wb")
                offset = start = 0
            data = tensor.tobytes()  # the lazy producer runs here; released after the write
            if len(data) != nbytes:
                raise AssertionError(f"{value.name}: {len(data)} bytes for a {nbytes}-byte tensor")
            if start > offset:
                handle.write(b"\0" * (start - offset))
            handle.write(data)
            del data
            offset = start + nbytes
            value.const_value = ir.ExternalTensor(
                names[-1],
                start,
                nbytes,
                tensor.dtype,
                shape=ir.Shape(tensor.shape.numpy()),  # static: a stored tensor
                name=name,
                base_dir=path.parent,
            )
    finally:
        if handle is not None:
            handle.close()
    ir.save(model, path)
    for name in [path.name, *names]:
        os.chmod(path.parent / name, FILE_MODE)
    return names


def make_readable(folder: Path) -> None:
    """Every file 0644 and every folder 0755 (temporary folders start 0700, copies keep odd modes)."""
    folder = Path(folder)
    os.chmod(folder, DIR_MODE)
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)
