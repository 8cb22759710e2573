"""The INT8 model of a bundle (`inspect-export … --int8`): quantize-dequantize (QDQ) ONNX from NNCF's post-training
quantization, activations calibrated on the run's own good training images, the backbone's convolutions in INT8
with per-channel weights; everything after them (distances, the Min over the bank, normalisation, upsampling,
smoothing) stays float. No torch: it runs on a bundle too.

NNCF was chosen by measurement over ONNX Runtime's quantize_static (BENCHMARKS.md, "INT8"): on bottle ONNX Runtime's
QDQ model scored image AUROC 0.32 through OpenVINO and 0.98 through ONNX Runtime; NNCF's scores the same through
both. With NNCF's full bias correction and the stem and first block in float PatchCore's metrics match fp32.

The accuracy guard, on the held-out good images: the INT8 maps must correlate with fp32's (Pearson ≥
MIN_MAP_CORRELATION over all pixels), and the INT8 image scores may scatter around fp32's by at most
MAX_SCORE_NOISE of the good scores' spread (the standard deviation of their differences over that of the fp32
scores; a common shift is harmless, the INT8 model gets thresholds of its own). Map correlation alone let DFR on
bottle lose 0.063 image AUROC at 0.995 correlation (score noise 0.30σ). On labelled data, when given, image AUROC
may fall by at most MAX_AUROC_DROP. A model that misses is not kept: the convolutions of the first block are kept
in float, then of the next, until the guard holds; if it never does, no INT8 model is written and the numbers say
why."""

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeinspect.runtime.console import InspectError, console, warn
from edgeinspect.runtime.inference.backends import open_backend
from edgeinspect.runtime.inference.bundle import Bundle
from edgeinspect.runtime.inference.images import load_resized

from .tensorrt_check import check_tensorrt

INT8_MODEL_FILE = "model_int8.onnx"
MIN_MAP_CORRELATION = 0.95
MAX_SCORE_NOISE = 0.2  # in standard deviations of the fp32 good scores (BENCHMARKS.md, "INT8": how it was chosen)
MIN_IMAGES_FOR_SCORE_NOISE = 10  # below this the spread of the good scores is no yardstick: map correlation only
MAX_AUROC_DROP = 0.01
CALIBRATION_IMAGES = 300  # at most; NNCF's default subset
# what stays float whatever the guard says: the patch features' distances and everything after the backbone
FLOAT_TYPES = ("MatMul", "Gemm", "ReduceMin", "ReduceMax", "Add", "Mul", "Sub", "Div", "Sqrt", "Concat", "Resize",
               "AveragePool", "Softmax", "Pow", "ReduceSum", "ReduceMean", "Clip", "Max", "Min")


class Int8Refused(InspectError):
    """No INT8 model held the guard; `attempts` holds what each try measured."""

    def __init__(self, message: str, attempts: list[dict]):
        super().__init__(message)
        self.attempts = attempts


@dataclass
class Guard:
    map_correlation: float
    score_noise: float | None  # std(int8 − fp32 scores) / std(fp32 scores), good images; None: too few
    image_auroc: tuple[float, float] | None = None  # (fp32, int8) on labelled data

    @property
    def holds(self) -> bool:
        return (self.map_correlation >= MIN_MAP_CORRELATION
                and (self.score_noise is None or self.score_noise <= MAX_SCORE_NOISE)
                and (self.image_auroc is None or self.image_auroc[0] - self.image_auroc[1] <= MAX_AUROC_DROP))

    def to_dict(self) -> dict:
        return {"map_correlation": round(self.map_correlation, 4), "min_map_correlation": MIN_MAP_CORRELATION,
                "score_noise": None if self.score_noise is None else round(self.score_noise, 3),
                "max_score_noise": MAX_SCORE_NOISE,
                **({"image_auroc_fp32": round(self.image_auroc[0], 4), "image_auroc_int8": round(self.image_auroc[1], 4),
                    "max_auroc_drop": MAX_AUROC_DROP} if self.image_auroc else {})}

    def __str__(self) -> str:
        text = f"map correlation {self.map_correlation:.3f} (at least {MIN_MAP_CORRELATION}), " + (
            f"score noise {self.score_noise:.2f}σ (at most {MAX_SCORE_NOISE}σ)" if self.score_noise is not None else
            f"score noise not measured (fewer than {MIN_IMAGES_FOR_SCORE_NOISE} held-out good images)")
        if self.image_auroc:
            text += f", image AUROC {self.image_auroc[1]:.3f} against fp32 {self.image_auroc[0]:.3f} (at most " \
                    f"{MAX_AUROC_DROP} lower)"
        return text


def backbone_stages(model: onnx.ModelProto) -> list[list[str]]:
    """The convolutions in graph order, grouped by the backbone stage they belong to (timm's blocks.N, the stem
    with the first): what the guard's fallback keeps in float, one stage more each time. A graph without such
    stages (the pixel autoencoder) has one convolution per stage, from both ends inwards: the layers next to
    the image and to the output first."""
    stages: dict[str, list[str]] = {}
    convs = [node.name for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    for name in convs:
        stage = next((part for part in name.split("/") if part.startswith("blocks.")), "blocks.0")
        stages.setdefault(stage, []).append(name)
    if len(stages) > 1:
        return list(stages.values())
    ends_inwards = [convs[i // 2] if i % 2 == 0 else convs[-1 - i // 2] for i in range(len(convs))]
    return [[name] for name in ends_inwards]


def quantize(model: onnx.ModelProto, images: np.ndarray, float_convs: list[str]) -> onnx.ModelProto:
    """NNCF's post-training quantization (its default symmetric preset, per-channel weights) with full bias
    correction; `float_convs` and FLOAT_TYPES are left unquantized."""
    import nncf
    from nncf.common.logging import nncf_logger

    nncf_logger.setLevel(logging.WARNING)  # a line per node it leaves alone otherwise
    dataset = nncf.Dataset([{model.graph.input[0].name: images[i:i + 1]} for i in range(len(images))])
    scope = nncf.IgnoredScope(names=float_convs, types=list(FLOAT_TYPES), validate=False)
    return nncf.quantize(model, dataset, subset_size=len(images), fast_bias_correction=False, ignored_scope=scope)


def for_every_backend(model: onnx.ModelProto) -> onnx.ModelProto:
    """NNCF's QDQ model in the form TensorRT parses and the CPU backends run alike."""
    return without_unused_opsets(signed_activations(model))


def signed_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """TensorRT takes symmetric signed INT8 only; NNCF quantizes the activations after ReLU6 as unsigned (zero
    point 0). Those become signed quantizers of the same range at twice the step (one bit less), so that one
    model runs everywhere: measured on bottle, map correlation 0.987 instead of 0.989 and OpenVINO 6% slower
    than the unsigned form (BENCHMARKS.md, "INT8"). An asymmetric quantizer is left for the TensorRT check."""
    initializers = {init.name: init for init in model.graph.initializer}
    changed, quantized = set(), set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        scale, zero_point = initializers[node.input[1]], initializers[node.input[2]]
        values = numpy_helper.to_array(zero_point)
        if zero_point.name not in changed and (zero_point.data_type != onnx.TensorProto.UINT8 or values.any()):
            continue
        for tensor, value in ((zero_point, values.astype(np.int8)),
                              (scale, numpy_helper.to_array(scale) * np.float32(255 / 127))):
            if tensor.name not in changed:
                tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
                changed.add(tensor.name)
        if node.op_type == "QuantizeLinear":
            quantized.add(node.output[0])
    for info in model.graph.value_info:  # the quantized tensors' recorded type follows the zero point's
        if info.name in quantized:
            info.type.tensor_type.elem_type = onnx.TensorProto.INT8
    return model


def without_unused_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's pre-processing declares its own operator domains; TensorRT's parser needs none of them."""
    used = {node.domain for node in model.graph.node} | {"", "ai.onnx"}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def guard(bundle: Bundle, int8_path: Path, good: np.ndarray, labelled: tuple[np.ndarray, np.ndarray] | None) -> Guard:
    """INT8 against fp32 through OpenVINO, the CPU backend that runs the INT8 model."""
    candidate = Bundle(bundle.path, {**bundle.record, "int8_model_file": int8_path.name})
    fp32, int8 = open_backend(bundle, "openvino"), open_backend(candidate, "openvino", precision="int8")
    maps32, scores32 = fp32(good)
    maps8, scores8 = int8(good)
    correlation = float(np.corrcoef(maps32.ravel(), maps8.ravel())[0, 1])
    noise = None
    if len(good) >= MIN_IMAGES_FOR_SCORE_NOISE and np.std(scores32) > 0:
        noise = float(np.std(scores8 - scores32) / np.std(scores32))
    auroc = None
    if labelled is not None:
        from edgeinspect.calibration.metrics import auroc as roc_auc

        images, labels = labelled
        auroc = (roc_auc(labels, fp32(images)[1]), roc_auc(labels, int8(images)[1]))
    return Guard(correlation, noise, auroc)


def add_int8_model(bundle: Bundle, calibration: list[Path], labelled: tuple[list[Path], np.ndarray] | None = None
                   ) -> None:
    """Write model_int8.onnx into the bundle folder and its record into bundle.json (not saved here); refuse with
    the guard's numbers when no INT8 model holds the bound."""
    try:
        import nncf
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise InspectError(f"--int8 needs NNCF and ONNX Runtime ({error.name} is not installed): "
                           "pip install 'edge-inspect[int8,cpu]'") from None

    clock = time.perf_counter()
    images, _ = load_resized(calibration[:CALIBRATION_IMAGES], bundle.input_size)
    validation = [Path(p) for p in (bundle.record.get("training") or {}).get("validation", []) if Path(p).is_file()]
    if not validation:
        raise InspectError(f"{bundle.path}: the held-out good images are not here; the INT8 guard needs them")
    good, _ = load_resized(validation, bundle.input_size)
    labelled_images = None
    if labelled is not None:
        labelled_images = (load_resized(labelled[0], bundle.input_size)[0], labelled[1])
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(bundle.model_file), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        stages = backbone_stages(model)
        if not stages:
            raise Int8Refused(f"{bundle.model_file}: no convolution to quantize", [])
        attempts = []
        for kept in range(len(stages)):  # the last stage stays INT8: with none, there is no INT8 model
            float_convs = [name for stage in stages[:kept] for name in stage]
            onnx.save(for_every_backend(quantize(model, images, float_convs)), str(bundle.path / INT8_MODEL_FILE))
            result = guard(bundle, bundle.path / INT8_MODEL_FILE, good, labelled_images)
            attempts.append({"float_stages": kept, **result.to_dict()})
            if result.holds:
                break
            if kept < len(stages) - 1:
                warn(f"INT8 with {kept} backbone stage(s) in float: {result}; keeping one more stage in float")
        else:
            (bundle.path / INT8_MODEL_FILE).unlink()
            raise Int8Refused(f"no INT8 model holds the accuracy bound, even with only the last backbone stage in "
                              f"INT8 ({result}); the bundle has none", attempts)

    quantized = sum(1 for stage in stages for _ in stage) - len(float_convs)
    tensorrt = check_tensorrt(bundle.path / INT8_MODEL_FILE, bundle.record["batch_profile"][-1])
    bundle.record["int8_model_file"] = INT8_MODEL_FILE
    bundle.record["int8"] = {"quantizer": f"nncf {nncf.__version__}", "calibration_images": len(images),
                             "int8_convs": quantized, "float_convs": float_convs, "guard": attempts[-1],
                             "attempts": attempts, "tensorrt_check": tensorrt.to_dict(),
                             "seconds": round(time.perf_counter() - clock, 1)}
    console.print(f"INT8 model written: {quantized} convolutions in INT8, {len(float_convs)} kept in float; {result}")
