"""Inference backends: each runs the bundle's graph on a batch of uint8 RGB images (B, H, W, 3) and returns
(anomaly_map (B, H, W) float32, score (B,) float32). The runtime picks the best one available."""

import os

import numpy as np

from .bundle import Bundle
from .console import InspectError


class OrtCpuBackend:
    name = "ort-cpu"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(bundle.model_file), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise InspectError(f"{bundle.model_file}: ONNX Runtime cannot load it ({error})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = bundle.record["outputs"]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.session.run(self.output_names, {self.input_name: images})
        return anomaly_map[:, 0], score


BACKENDS = {OrtCpuBackend.name: OrtCpuBackend}


def open_backend(bundle: Bundle, name: str = "auto", threads: int | None = None):
    if name == "auto":
        name = "ort-cpu"
    if name not in BACKENDS:
        raise InspectError(f"--backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
    return BACKENDS[name](bundle, threads)
