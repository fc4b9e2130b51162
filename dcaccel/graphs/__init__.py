"""What every family and backend shares about a graph: specs, buffers, ONNX export, the weight map, and the one
check against eager PyTorch. Nothing here knows a model family or a backend."""
