"""inspect-calibrate and inspect-eval: thresholds and metrics measured through the bundle, without torch."""

from pathlib import Path

import typer
from rich.table import Table

from edgeinspect.runtime.console import InspectError, command_app, console, one_line_errors
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.files import atomic_write_json, writable_dir, writable_file_parent
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.signing import load_key, sign
from edgeinspect.runtime.inference.images import list_images

from .evaluate import METRIC_COLUMNS, evaluate, metrics_rows, predict
from .teach import rollback, teach
from .thresholds import calibrate, check_options

TRUST = typer.Option(None, "--trust", help="Public key (PEM) whose signature the bundle must carry (repeat for "
                     "several); an unsigned or otherwise signed bundle is refused.")
calibrate_app = command_app()
eval_app = command_app()
teach_app = command_app()


@calibrate_app.command()
@one_line_errors
def calibrate_command(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export."),
    images: Path = typer.Option(None, "--images", help="Folder of good images captured on the line "
                                "(default: the held-out validation images recorded at training)."),
    method: str = typer.Option("sigma", "--method", help="sigma: threshold = μ + k·σ of the good scores; robust: "
                                "median + k·1.4826·MAD (unmoved by a few odd good images); quantile: the (1 − fpr) "
                                "quantile."),
    k: float = typer.Option(3.0, "--k", help="k of the sigma and robust methods."),
    fpr: float = typer.Option(0.01, "--fpr", help="False-alarm rate on good images of the quantile method."),
    trust: list[Path] = TRUST,
    precision: str = typer.Option("auto", "--precision", help="Calibrate the fp32 or the int8 model (auto: int8 where "
                                  "the bundle has one); the thresholds say which, and the runtime runs that one."),
    sign_key: Path = typer.Option(None, "--sign", help="Ed25519 private key (PEM) to sign the calibrated bundle "
                                  "with: its thresholds change, so a signature from before no longer covers it."),
):
    """Set the image and pixel thresholds from held-out good images, run through the bundle itself."""
    check_options(method, k, fpr)
    if sign_key is not None:
        load_key(sign_key, "private", "--sign")  # before the images are run
    bundle = load_bundle(bundle_dir, trust=trust)
    if images is not None:
        paths, source = list_images(images), str(images)
    else:
        recorded = (bundle.record.get("training") or {}).get("validation")
        if not recorded:
            raise InspectError(f"{bundle.path / 'bundle.json'}: no held-out validation images recorded "
                               "(training.validation); pass --images with a folder of good images")
        paths, source = [Path(p) for p in recorded], "validation"
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise InspectError(f"{missing[0]}: validation image not found ({len(missing)} missing); "
                               "pass --images with a folder of good images")
    thresholds = calibrate(bundle, paths, k, source, method, fpr, precision)
    rule = {"sigma": f"μ + {k:g}σ", "robust": f"median + {k:g}·1.4826·MAD", "quantile": f"{1 - fpr:g} quantile"}
    table = Table("level", "n", "μ", "σ", "rule", "threshold", "good above it",
                  title=f"calibration of the {thresholds['precision']} model on {len(paths)} good images ({source})")
    for level in ("image", "pixel"):
        t = thresholds[level]
        table.add_row(level, str(t["n"]), f"{t['mean']:.4g}", f"{t['std']:.4g}", rule[method], f"{t['threshold']:.4g}",
                      f"{100 * t['fraction_above']:.2f}%")
    robust = thresholds["image"].get("robust_alternative")
    if robust:  # the scores' tail makes μ + kσ unreliable: what the robust rule would give, not applied
        table.add_row("image, not applied", "", "", "", f"{rule['robust']} (--method robust)",
                      f"{robust['threshold']:.4g}", f"{100 * robust['fraction_above']:.2f}%")
    console.print(table)
    if sign_key is not None:
        bundle.record["signature"] = sign(bundle.record, sign_key)
        bundle.save()
        console.print(f"signed with key {bundle.record['signature']['key']}")
    console.print(f"written to {bundle.path / 'bundle.json'}")


@eval_app.command()
@one_line_errors
def eval_command(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export (calibrated or not)."),
    data: str = typer.Option(..., "--data", help="MVTec AD category folder, or a built-in name (elpv)."),
    out: Path = typer.Option(None, "--out", help="Where to write the metrics JSON (default: BUNDLE/eval.json)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per inference call."),
    report: Path = typer.Option(None, "--report", help="Folder to write report.html into: metrics, curves, "
                                "score histograms and a gallery of misses, false alarms and detections."),
    trust: list[Path] = TRUST,
    precision: str = typer.Option("auto", "--precision", help="fp32 or int8 (auto: what the thresholds were "
                                  "calibrated for)."),
):
    """Image AUROC, pixel AUROC, AUPRO, F1-max and precision/recall/accuracy at the calibrated threshold,
    per defect type and overall (pixel metrics only where the data set has ground-truth masks)."""
    if batch_size < 1:
        raise InspectError(f"--batch-size must be at least 1, got {batch_size}")
    bundle = load_bundle(bundle_dir, trust=trust)
    # where the results go is checked before anything is computed
    out = writable_file_parent(out, "--out") if out is not None else writable_file_parent(
        bundle.path / "eval.json", "--out (default BUNDLE/eval.json)")
    if report is not None:
        report = writable_dir(report, "--report")
    dataset = open_dataset(data)
    predictions = predict(bundle, dataset, batch_size, precision=precision)
    result = evaluate(bundle, predictions, dataset.name)
    table = Table(*METRIC_COLUMNS, title=f"{result['dataset']}: {result['n_images']} test images")
    for row in metrics_rows(result):
        table.add_row(*row)
    console.print(table)
    atomic_write_json(out, result)
    console.print(f"metrics written to {out}")
    if report is not None:
        from .report import write_report

        console.print(f"report written to {write_report(report, bundle, dataset, predictions, result)}")


@teach_app.command()
@one_line_errors
def teach_command(
    bundle_dir: Path = typer.Argument(..., help="PatchCore bundle folder (calibrated)."),
    good: Path = typer.Option(None, "--good", help="Folder of frames the bundle flags that are good parts (false "
                              "alarms): their new patches join the memory bank, every 4th frame recalibrates."),
    defects: Path = typer.Option(None, "--defects", help="Folder of confirmed defects: teaching is refused when one "
                                 "that the current version catches would pass."),
    by: str = typer.Option(None, "--by", help="Who taught it, for the version record (default: the user name)."),
    rollback_: bool = typer.Option(False, "--rollback", help="Put the previous version back (kept in "
                                   "BUNDLE.versions/); the current one is kept as vN-rolled-back."),
    trust: list[Path] = TRUST,
    sign_key: Path = typer.Option(None, "--sign", help="Ed25519 private key (PEM) to sign the new version with."),
):
    """Teach a PatchCore bundle good parts it flags, on the box without retraining: a new version, the previous
    one kept."""
    if rollback_:
        if good is not None or defects is not None:
            raise InspectError("--rollback takes no --good or --defects")
        bundle = rollback(bundle_dir)
        console.print(f"{bundle.path} is version {(bundle.record.get('version') or {}).get('number', 1)} again "
                      f"(model {bundle.record['files'][bundle.record['model_file']]['sha256'][:16]})")
        return
    if good is None:
        raise InspectError("--good: give the folder of good frames to teach (or --rollback)")
    if sign_key is not None:
        load_key(sign_key, "private", "--sign")
    bundle = teach(bundle_dir, list_images(good), list_images(defects) if defects is not None else [], by, trust)
    if sign_key is not None:
        bundle.record["signature"] = sign(bundle.record, sign_key)
        bundle.save()
        console.print(f"signed with key {bundle.record['signature']['key']}")
    version = bundle.record["version"]
    console.print(f"{bundle.path} is now version {version['number']}: {version['taught']['entries_added']} bank entries "
                  f"added, image threshold {bundle.thresholds['image']['threshold']:.4g}; the previous version is in "
                  f"{bundle.path.parent / (bundle.path.name + '.versions')} (inspect-teach {bundle.path} --rollback)")


def calibrate_main():
    calibrate_app()


def eval_main():
    eval_app()


def teach_main():
    teach_app()
