"""Signed bundles: inspect-export and inspect-calibrate sign with an Ed25519 key; --trust makes inspect-run,
-calibrate and -eval refuse a bundle that is unsigned, signed by another key, or changed after signing (a threshold
raised to let defects pass, a model swapped with its digest); the engine a device builds for itself does not
break it; a recalibration without the key removes the signature and says so."""

import json
import shutil

import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from edgeinspect.calibration.cli import calibrate_app, eval_app
from edgeinspect.export.cli import app as export_app
from edgeinspect.runtime.commands.run import app as run_app
from edgeinspect.runtime.files import sha256_file
from edgeinspect.runtime.inference.bundle import load_bundle

runner = CliRunner()


def key_pair(folder, name: str):
    """An Ed25519 key pair as PEM files, as `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write."""
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def invoke(app, args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def refused(app, args, message: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output


@pytest.fixture
def signed(patchcore_bundle, tmp_path):
    """A copy of the calibrated bundle, signed by inspect-calibrate --sign; (bundle, public key, other key)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(patchcore_bundle, bundle)
    key, public = key_pair(tmp_path, "line")
    _, other = key_pair(tmp_path, "other")
    assert "signed with key" in invoke(calibrate_app, [bundle, "--sign", key])
    return bundle, public, other


def run_args(bundle, mvtec_like, tmp_path, *extra):
    return [bundle, "--source", mvtec_like / "test" / "pasted", "--out", tmp_path / "out", *extra]


def test_a_signed_bundle_runs_under_its_key_and_no_other(signed, mvtec_like, tmp_path):
    bundle, public, other = signed
    invoke(run_app, run_args(bundle, mvtec_like, tmp_path, "--trust", public))
    invoke(eval_app, [bundle, "--data", mvtec_like, "--trust", public, "--out", tmp_path / "eval.json"])
    refused(run_app, run_args(bundle, mvtec_like, tmp_path, "--trust", other), "which is not among the --trust keys")


def test_an_unsigned_bundle_is_refused_where_trust_is_asked(patchcore_bundle, mvtec_like, tmp_path):
    _, public = key_pair(tmp_path, "line")
    refused(run_app, run_args(patchcore_bundle, mvtec_like, tmp_path, "--trust", public), "the bundle is not signed")
    invoke(run_app, run_args(patchcore_bundle, mvtec_like, tmp_path))  # without --trust, as before


def test_a_threshold_raised_after_signing_is_refused(signed, mvtec_like, tmp_path):
    """Whoever can write the folder raises the image threshold so that every defect passes: refused."""
    bundle, public, _ = signed
    record = json.loads((bundle / "bundle.json").read_text())
    record["thresholds"]["image"]["threshold"] *= 100
    (bundle / "bundle.json").write_text(json.dumps(record))
    refused(run_app, run_args(bundle, mvtec_like, tmp_path, "--trust", public), "changed after signing")


def test_a_model_swapped_with_its_digest_is_refused(signed, mvtec_like, tmp_path):
    bundle, public, _ = signed
    model = onnx.load(str(bundle / "model.onnx"))
    weights = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.raw_data)
    weights.raw_data = bytes(len(weights.raw_data))  # same graph, other weights
    onnx.save(model, str(bundle / "model.onnx"))
    record = json.loads((bundle / "bundle.json").read_text())
    record["files"]["model.onnx"] = {"sha256": sha256_file(bundle / "model.onnx"),
                                     "bytes": (bundle / "model.onnx").stat().st_size}
    (bundle / "bundle.json").write_text(json.dumps(record))
    load_bundle(bundle)  # whole and consistent: only the signature tells
    refused(run_app, run_args(bundle, mvtec_like, tmp_path, "--trust", public), "changed after signing")


def test_the_devices_own_engine_does_not_break_the_signature(signed, mvtec_like, tmp_path):
    """An engine built on the device adds its file and record to bundle.json; the signature does not cover them
    (the engine's record names the signed ONNX it was built from)."""
    bundle, public, _ = signed
    (bundle / "model.engine").write_bytes(b"a device's own engine")
    record = json.loads((bundle / "bundle.json").read_text())
    record["engine"] = {"file": "model.engine", "batch_sizes": [1, 1, 8]}
    record["files"]["model.engine"] = {"sha256": sha256_file(bundle / "model.engine"), "bytes": 21}
    (bundle / "bundle.json").write_text(json.dumps(record))
    assert load_bundle(bundle, trust=[public]).record["engine"]["file"] == "model.engine"


def test_recalibrating_without_the_key_removes_the_signature_and_says_so(signed, mvtec_like, tmp_path):
    bundle, public, _ = signed
    output = invoke(calibrate_app, [bundle, "--images", mvtec_like / "train" / "good", "--trust", public])
    assert "signature is removed" in output and "signature" not in load_bundle(bundle).record
    refused(run_app, run_args(bundle, mvtec_like, tmp_path, "--trust", public), "the bundle is not signed")


def test_export_signs_and_bad_keys_are_one_line(mvtec_like, tmp_path):
    key, public = key_pair(tmp_path, "line")
    from edgeinspect.train.cli import app as train_app

    invoke(train_app, ["patchcore", "--data", mvtec_like, "--out", tmp_path / "run", "--image-size", 64,
                       "--coreset-ratio", 0.25])
    (tmp_path / "not-a-key.pem").write_text("hello")
    refused(export_app, [tmp_path / "run", "--sign", tmp_path / "not-a-key.pem"], "not a PEM private key")
    assert not (tmp_path / "run" / "bundle").exists()  # refused before anything was exported
    assert "signed with key" in invoke(export_app, [tmp_path / "run", "--sign", key])
    assert load_bundle(tmp_path / "run" / "bundle", trust=[public]).record["signature"]["algorithm"] == "ed25519"
    refused(run_app, [tmp_path / "run" / "bundle", "--source", mvtec_like, "--trust", key], "not a PEM public key")


def test_the_line_config_names_the_trusted_keys(signed, mvtec_like, tmp_path):
    bundle, public, other = signed
    config = tmp_path / "line.toml"
    config.write_text(f'bundle = "{bundle}"\nout = "out"\ntrust = ["{other.name}"]\n\n[[sources]]\n'
                      f'source = "{mvtec_like / "test" / "pasted"}"\n')
    refused(run_app, ["--config", config], "which is not among the --trust keys")
    invoke(run_app, ["--config", config, "--trust", public])
