"""Export a training run to a bundle: the ONNX graph, checked against PyTorch, plus bundle.json."""
