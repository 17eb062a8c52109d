"""ONNX: the graph builder over the forward description, export, the onnxruntime runner, verify."""
