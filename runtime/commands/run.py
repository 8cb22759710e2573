"""inspect-run: inspect every frame of a camera, video, stream or image folder with a calibrated bundle."""

import contextlib
import json
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from edgeinspect.runtime.capture.grabbers import Grabber, Grabbers
from edgeinspect.runtime.capture.sources import named_source, open_source, shown_url
from edgeinspect.runtime.commands.line_config import apply_line_config
from edgeinspect.runtime.commands.line_config import print_config as line_config_text
from edgeinspect.runtime.commands.service import ServiceNotifier
from edgeinspect.runtime.console import (
    InspectError,
    RateLimitedWarning,
    command_app,
    console,
    one_line_errors,
    warn,
)
from edgeinspect.runtime.files import atomic_write_json, writable_dir
from edgeinspect.runtime.frame_loop import (
    FrameLoop,
    LatencyStats,
    check_batch_and_threads,
    inspect_until_done,
)
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.hot_swap import HotSwap, bundle_fingerprint
from edgeinspect.runtime.inference.images import list_images
from edgeinspect.runtime.inference.inspector import Inspector
from edgeinspect.runtime.outputs.collect import CollectSink
from edgeinspect.runtime.outputs.console_sink import ConsoleSink
from edgeinspect.runtime.outputs.health import (
    Health,
    HealthSink,
    Limits,
    console_listener,
    log_listener,
)
from edgeinspect.runtime.outputs.labels import LabelStore, TeachJob
from edgeinspect.runtime.outputs.live_view import LiveView, LiveViewSink, about_run
from edgeinspect.runtime.outputs.out_folder import (
    OutLock,
    new_run_id,
    parse_bytes,
    positive_finite,
)
from edgeinspect.runtime.outputs.overlays import DiskBudget, OverlayStore
from edgeinspect.runtime.outputs.run_log import JsonLog
from edgeinspect.runtime.outputs.sinks import Sinks
from edgeinspect.runtime.outputs.view_access import (
    TOKEN_FILE,
    check_view_host,
    is_loopback,
    load_or_create_token,
)
from rich.markup import escape

app = command_app()


class Save(str, Enum):
    ng = "ng"
    all = "all"
    none = "none"


class Mode(str, Enum):
    auto = "auto"
    latest = "latest"
    every = "every"


@contextmanager
def stop_on_signals(stop: threading.Event, reload: Callable[[], None]):
    """SIGINT and SIGTERM end the run cleanly, and a second one while it stops changes nothing: the outputs still
    close within their deadlines and the summary is written. SIGHUP loads the bundle again (`reload`), as
    systemd's reload does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
@one_line_errors
def run(
    ctx: typer.Context,
    bundle_dir: Path = typer.Argument(None, help="Bundle folder written by inspect-export (and calibrated); or "
                                      "bundle in --config."),
    source: list[str] = typer.Option(None, "--source", metavar="SOURCE", help="Image folder, video file, stream URL "
                                     "(rtsp://, http://), camera index, GStreamer pipeline (contains '!'), or elpv "
                                     "(its test cells). Repeat for several sources: one capture thread each, one "
                                     "backend."),
    camera: int = typer.Option(None, "--camera", help="Camera index (OpenCV / V4L2), short for --source N."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder for inspections.jsonl, summary.json and overlays "
                             "(one run at a time: it is locked)."),
    save: Save = typer.Option(Save.ng, "--save", help="Which frames to save with the heat-map overlay."),
    mode: Mode = typer.Option(Mode.auto, "--mode", help="latest: newest frame only, count the skipped ones "
                              "(default for cameras and streams); every: each frame in order (default for files)."),
    batch: int = typer.Option(1, "--batch", help="Frames per inference call (mode every; with several sources at "
                              "least one per source)."),
    watch: bool = typer.Option(False, "--watch", help="Keep watching an image folder for new files."),
    loop: bool = typer.Option(False, "--loop", help="Play a video file again from the start when it ends."),
    max_frames: int = typer.Option(0, "--max-frames", help="Stop after this many frames (0: until the source ends "
                                   "or SIGINT/SIGTERM)."),
    view: int = typer.Option(None, "--view", help="Serve the annotated stream and statistics on this HTTP port "
                             "(a page at /, MJPEG at /stream.mjpg); 0 picks a free port."),
    view_host: str = typer.Option("127.0.0.1", "--view-host", help="Address the live view listens on (0.0.0.0 "
                                  "to reach it from another machine)."),
    view_clients: int = typer.Option(8, "--view-clients", help="Most live-view connections at once; more get 503."),
    view_token_file: Path = typer.Option(None, "--view-token-file", help="File holding the live view's access token "
                                         "(created with a random one if missing, owner-only); default beyond "
                                         "loopback: OUT/view-token. Given, the token is needed on loopback too "
                                         "(behind a reverse proxy)."),
    collect_good: Path = typer.Option(None, "--collect-good", help="Save frames as they come from the camera path "
                                      "(PNG, lossless, before the resize) into this folder, while the line makes good "
                                      "parts, to recalibrate on: inspect-calibrate BUNDLE --images DIR."),
    collect: int = typer.Option(50, "--collect", help="How many frames --collect-good saves (then it stops saving; "
                                "the run goes on)."),
    collect_every: float = typer.Option(None, "--collect-every", help="Seconds between frames --collect-good saves "
                                        "(default: 1 for cameras and streams, 0 for files and folders)."),
    log_rotate: str = typer.Option(None, "--log-rotate", help="Start a new inspections.jsonl at this size (e.g. "
                                   "100MB) or daily (UTC); default: at a tenth of --max-disk, else never."),
    log_gzip: bool = typer.Option(False, "--log-gzip", help="Gzip rotated logs."),
    max_disk: str = typer.Option(None, "--max-disk", help="Most disk the run folder may use (e.g. 2GB): the oldest "
                                 "overlays, then rotated logs, are deleted first."),
    keep_days: float = typer.Option(None, "--keep-days", help="Delete overlays and rotated logs older than this."),
    mqtt: str = typer.Option(None, "--mqtt", help="Publish every record to mqtt://HOST[:PORT]/TOPIC-PREFIX "
                             "(mqtts:// for TLS): PREFIX/frames, PREFIX/ng, retained PREFIX/status, PREFIX/heartbeat."),
    mqtt_username: str = typer.Option(None, "--mqtt-username", help="MQTT user name."),
    mqtt_password: str = typer.Option(None, "--mqtt-password", envvar="EDGE_INSPECT_MQTT_PASSWORD",
                                      help="MQTT password (or $EDGE_INSPECT_MQTT_PASSWORD)."),
    mqtt_ca: Path = typer.Option(None, "--mqtt-ca", help="CA certificate file for TLS."),
    mqtt_cert: Path = typer.Option(None, "--mqtt-cert", help="Client certificate file for TLS."),
    mqtt_key: Path = typer.Option(None, "--mqtt-key", help="Client key file for TLS."),
    mqtt_queue: int = typer.Option(100_000, "--mqtt-queue", help="Most messages kept on disk while the broker is "
                                   "unreachable (the oldest are dropped beyond it)."),
    mqtt_heartbeat: float = typer.Option(10.0, "--mqtt-heartbeat", help="Seconds between heartbeats."),
    modbus: str = typer.Option(None, "--modbus", help="Serve the verdicts to the line's PLC over Modbus TCP on "
                               "HOST:PORT (e.g. 0.0.0.0:5020; the register map is in the README, \"The PLC\")."),
    modbus_ng: str = typer.Option("latched", "--modbus-ng", help="The NG coil: latched (until the PLC writes 0) or "
                                  "pulse."),
    modbus_pulse_ms: int = typer.Option(500, "--modbus-pulse-ms", help="How long a pulsed NG coil stays set."),
    opcua: str = typer.Option(None, "--opcua", help="Serve the verdicts to the line's PLC over OPC UA on "
                              "opc.tcp://HOST:PORT (e.g. opc.tcp://0.0.0.0:4840; README, \"The PLC\")."),
    opcua_username: str = typer.Option(None, "--opcua-username", help="The OPC UA user name (needed beyond "
                                       "loopback; with it, only signed and encrypted endpoints)."),
    opcua_password: str = typer.Option(None, "--opcua-password", envvar="EDGE_INSPECT_OPCUA_PASSWORD",
                                       help="The OPC UA password (or $EDGE_INSPECT_OPCUA_PASSWORD)."),
    opcua_pki: Path = typer.Option(None, "--opcua-pki", help="The OPC UA server's key and certificate (made on "
                                   "first use) and trusted/ and rejected/ client certificates (default: OUT/opcua-pki)."),
    backend: str = typer.Option("auto", "--backend", help="auto, tensorrt, ort-tensorrt, ort-cuda, openvino or ort-cpu."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for inference (default: all cores)."),
    precision: str = typer.Option("auto", "--precision", help="fp32 or int8 (auto: what the thresholds were "
                                  "calibrated for)."),
    trust: list[Path] = typer.Option(None, "--trust", help="Public key (PEM) whose signature the bundle must carry "
                                     "(repeat for several); an unsigned or otherwise signed bundle is refused."),
    config: Path = typer.Option(None, "--config", help="Line config file (TOML) holding these options, the "
                                "sources' names and the alarms' limits; a flag given here overrides it."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the options given as a line config "
                                      "file (passwords as references) and exit."),
):
    """Score every frame, give an OK/NG verdict against the calibrated threshold, log one JSON line per frame
    and save NG frames with the anomaly heat map and the regions above the pixel threshold outlined."""
    options = {name: value for name, value in ctx.params.items() if name not in ("config", "print_config")}
    given = {name for name in options  # by name: Typer carries its own copy of click and of this enum
             if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}
    limits = Limits()
    if config is not None:
        options, limits = apply_line_config(options, given, config)
    if print_config:
        defaults = {param.name: param.default for param in ctx.command.params}
        typer.echo(line_config_text(options, defaults), nl=False)
        return
    inspect_line(**options, limits=limits)


def inspect_line(bundle_dir: Path | None, source: list[str] | None, camera: int | None, out: Path, save: str,
                 mode: str, batch: int, watch: bool, loop: bool, max_frames: int, view: int | None, view_host: str,
                 view_clients: int, view_token_file: Path | None, collect_good: Path | None, collect: int, collect_every: float | None,
                 log_rotate: str | None, log_gzip: bool, max_disk: str | None, keep_days: float | None,
                 mqtt: str | None, mqtt_username: str | None, mqtt_password: str | None, mqtt_ca: Path | None,
                 mqtt_cert: Path | None, mqtt_key: Path | None, mqtt_queue: int, mqtt_heartbeat: float, backend: str,
                 threads: int | None, precision: str = "auto", trust: list[Path] | None = None,
                 source_names: list[str] | None = None, limits: Limits = Limits(), modbus: str | None = None,
                 modbus_ng: str = "latched", modbus_pulse_ms: int = 500, opcua: str | None = None,
                 opcua_username: str | None = None, opcua_password: str | None = None,
                 opcua_pki: Path | None = None) -> None:
    """One line's run, from inspect-run's options (flags, a line config file, or both)."""
    save, mode = Save(save), Mode(mode)
    if bundle_dir is None:
        raise InspectError("give the bundle folder (inspect-run BUNDLE, or bundle in --config)")
    sources = list(source or []) + ([str(camera)] if camera is not None else [])
    if not sources:
        raise InspectError("give --source (one or more), --camera, or sources in --config")
    check_batch_and_threads(batch, threads)
    for value, option, low in ((max_frames, "--max-frames", 0), (view_clients, "--view-clients", 1),
                               (mqtt_queue, "--mqtt-queue", 1)):
        if value < low:
            raise InspectError(f"{option} must be at least {low}, got {value}")
    if view is not None and not 0 <= view <= 65535:
        raise InspectError(f"--view {view}: a port is 0 to 65535")
    if view is not None:
        check_view_host(view_host)
    if mqtt_password and not mqtt_username:
        raise InspectError("--mqtt-password needs --mqtt-username")
    positive_finite(keep_days, "--keep-days")
    positive_finite(mqtt_heartbeat, "--mqtt-heartbeat")
    if modbus:  # checked, and the address tried, before a model or a camera is opened
        from edgeinspect.runtime.outputs.plc_modbus import (
            check_modbus_options,
            parse_modbus_address,
        )
        from edgeinspect.runtime.outputs.plc_process import check_bindable

        check_modbus_options(modbus, modbus_ng, modbus_pulse_ms)
        check_bindable(*parse_modbus_address(modbus), f"--modbus {modbus}")
    if opcua:
        from edgeinspect.runtime.outputs.plc_opcua import (
            check_opcua_options,
            parse_opcua_endpoint,
        )
        from edgeinspect.runtime.outputs.plc_process import check_bindable

        check_opcua_options(opcua, opcua_username, opcua_password)
        check_bindable(*parse_opcua_endpoint(opcua), f"--opcua {opcua}")
    max_bytes = parse_bytes(max_disk, "--max-disk") if max_disk else None
    rotate_bytes, rotate_daily = log_rotation(log_rotate, max_bytes)
    first_seen = bundle_fingerprint(bundle_dir)  # before loading: a version written meanwhile is taken in
    bundle = load_bundle(bundle_dir, trust=trust)
    if bundle.thresholds is None:
        warn(f"{bundle_dir} is not calibrated: scores only, no verdicts (run inspect-calibrate)")
    named = [named_source(text) for text in sources]
    sources = [text for _, text in named]
    if source_names and len(source_names) == len(sources):
        named = list(zip(source_names, sources))
    labels = source_labels(named)
    opened = [(label, open_source(text, watch, loop)) for label, text in zip(labels, sources)]
    mode = (Mode.latest if all(s.live for _, s in opened) else Mode.every) if mode == Mode.auto else mode
    out = writable_dir(out, "--out")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(OutLock(out).release)
        run_id = new_run_id()
        inspector = Inspector(bundle, backend, threads, precision)
        chosen = inspector.backend
        console.print(escape(f"run {run_id}, backend {chosen.name} ({inspector.precision})" + "".join(
            f"; not {name}: {why}" for name, why in chosen.passed_over.items())))
        in_use = {"backend": chosen.name}  # the backend of the version inspecting now
        stop = threading.Event()
        condition = threading.Condition()
        grabbers = Grabbers([Grabber(frames, mode.value, stop, queue_size=max(8, 2 * batch), label=label,
                                     condition=condition) for label, frames in opened])
        stats = LatencyStats()

        def summary() -> dict:
            counters = {g.label: {"dropped": g.dropped, "reconnects": g.source.reconnects} for g in grabbers.grabbers}
            return {**stats.summary(sum(c["dropped"] for c in counters.values()),
                                    sum(c["reconnects"] for c in counters.values()), counters),
                    "run": run_id, "backend": in_use["backend"]}

        if mqtt:  # the broker's address and the queue file checked before anything is written to --out
            from edgeinspect.runtime.outputs.mqtt import (
                DiskQueue,
                MqttSink,
                parse_mqtt_url,
            )

            target = parse_mqtt_url(mqtt)
            DiskQueue(out / "mqtt-queue.sqlite", mqtt_queue).close()
        limited = RateLimitedWarning()
        budget = DiskBudget(out, max_bytes, keep_days, limited)
        outputs = Sinks([], limited)
        cleanup.callback(outputs.close)
        log = JsonLog(out, rotate_bytes, rotate_daily, log_gzip, lambda path: budget.add("log", path), limited)
        outputs.sinks += [OverlayStore(out, save.value, run_id, budget, limited), log]
        health = Health(bundle.thresholds, bundle_dir, out, grabbers.grabbers, mode.value,
                        [shown_url(text) for text in sources], limits)
        health.listeners += [console_listener, log_listener(log, run_id)]  # and MQTT's PREFIX/alarms below
        about = about_run(bundle_dir, bundle, chosen.name, run_id, mode.value)
        plc = None  # the servers the PLC reads, in a process of their own
        if modbus or opcua:
            from edgeinspect.runtime.outputs.plc_process import (
                PlcServers,
                bundle_identity,
            )

            servers = []
            if modbus:
                servers.append(("modbus", {"address": modbus, "sources": labels, "ng_mode": modbus_ng,
                                           "pulse_ms": modbus_pulse_ms}))
            if opcua:
                servers.append(("opcua", {"endpoint": opcua, "sources": labels, "run_id": run_id,
                                          "bundle": bundle_identity(bundle), "pki": opcua_pki or out / "opcua-pki",
                                          "username": opcua_username, "password": opcua_password}))
            plc = PlcServers(servers)
            outputs.sinks.append(plc)
            health.listeners.append(plc.alarm)
            health.probes.append(("plc", plc.problem))
        if view is not None:
            token_file = view_token_file or (None if is_loopback(view_host) else out / TOKEN_FILE)
            token = load_or_create_token(token_file) if token_file else None
            marked = LabelStore(out)
            live_view = LiveView(view_host, view, view_clients, token=token, labels=marked,
                                 teaching=TeachJob(teacher(bundle_dir, trust), marked))
            console.print(f"live view on {live_view.url}" + (f" (sign in with the token in {token_file})"
                                                             if token else ""))
            outputs.sinks.append(LiveViewSink(live_view, summary, stats, grabbers.grabbers, health,
                                              about, plc))
        if mqtt:
            publisher = MqttSink(target, out / "mqtt-queue.sqlite", run_id, summary, mqtt_queue,
                                 mqtt_heartbeat, mqtt_username, mqtt_password, mqtt_ca, mqtt_cert, mqtt_key)
            outputs.sinks.append(publisher)
            health.listeners.append(lambda event: publisher.publish("alarms", json.dumps(event)))
        outputs.sinks.append(ConsoleSink(verbose=None if mode == Mode.latest else True))
        outputs.sinks.append(HealthSink(health))
        if collect_good is not None:
            every_s = collect_every if collect_every is not None else (1.0 if mode == Mode.latest else 0.0)
            outputs.sinks.append(CollectSink(collect_good, collect, every_s, run_id, bundle_dir))
        frame_loop = FrameLoop(inspector, outputs, stats, run_id)
        del inspector  # the frame loop holds the version in use; a swapped-out one is freed
        hot_swap = HotSwap(frame_loop, bundle_dir, lambda new: Inspector(new, backend, threads, precision),
                           health.bundle_problem, trust, seen=first_seen)
        if plc is not None:
            hot_swap.taken.append(lambda new: plc.use_bundle(new.bundle))
        hot_swap.taken += [lambda new: health.use_thresholds(new.bundle.thresholds),
                           lambda new: in_use.update(backend=new.backend.name),
                           lambda new: about.update(about_run(bundle_dir, new.bundle, new.backend.name, run_id,
                                                              mode.value))]
        count = max(batch, len(opened)) if mode == Mode.every else len(opened)
        service = ServiceNotifier()
        cleanup.callback(service.close)
        with stop_on_signals(stop, hot_swap.request):
            try:
                hot_swap.start()
                stats.restart()  # frames/s from here: the outputs' start-up is not the line's time
                grabbers.start()
                service.ready(f"run {run_id}, backend {in_use['backend']}, {len(opened)} source(s)")
                inspect_until_done(grabbers, frame_loop, stop, count, max_frames, service.alive)
            finally:
                result = summary()  # before anything stops: the goodbyes are not the line's time
                service.stopping()
                stop.set()
                hot_swap.stop()
                grabbers.join(timeout=5)
                outputs.close()
                result.update(sink_failures=outputs.failures, deleted_files=budget.deleted)
                if plc is not None:
                    result["plc_dropped_updates"] = plc.dropped
                result["alarms"] = health.alarms()
                write_summary(out / "summary.json", result)
    if grabbers.error is not None and not isinstance(grabbers.error, KeyboardInterrupt):
        raise grabbers.error
    report(result, out, labels)


def teacher(bundle_dir: Path, trust: list[Path] | None) -> Callable[[Path, Path | None], int]:
    """Teaching as the page starts it: the frames marked good, those marked defects as its guard."""
    def teach_labelled(good: Path, defects: Path | None) -> int:
        from edgeinspect.calibration.teach import teach

        if trust:
            raise InspectError(f"this line runs with --trust: a taught version must be signed, which the page cannot "
                               f"do; teach from a shell: inspect-teach {bundle_dir} --good {good} --sign KEY")
        taught = teach(bundle_dir, list_images(good), list_images(defects) if defects else [], "operator page", trust)
        return taught.record["version"]["number"]
    return teach_labelled


def log_rotation(log_rotate: str | None, max_bytes: int | None) -> tuple[int | None, bool]:
    """(bytes at which inspections.jsonl rotates or None, daily): --log-rotate, else a tenth of --max-disk."""
    if log_rotate == "daily":
        return None, True
    if log_rotate:
        return parse_bytes(log_rotate, "--log-rotate"), False
    return (max(max_bytes // 10, 4096) if max_bytes else None), False


def report(result: dict, out: Path, sources: list[str]) -> None:
    """The run's last console line; a run that read no frame at all is an error, with where the reasons are."""
    total = result.get("total_ms", {})
    console.print(f"{result['frames']} frames, {result['ng']} NG, {result['skipped']} skipped, {result['dropped']} "
                  f"dropped, {result['reconnects']} reconnects, {result['fps']:.1f} frames/s; latency p50 "
                  f"{total.get('p50', 0):.1f} ms, p95 {total.get('p95', 0):.1f} ms, p99 {total.get('p99', 0):.1f} ms; "
                  f"log: {out / 'inspections.jsonl'}")
    if result["frames"] == 0:
        raise InspectError(f"no frame could be read from {', '.join(sources)}"
                           + (f" ({result['skipped']} skipped: reasons in {out / 'inspections.jsonl'})"
                              if result["skipped"] else ""))


def write_summary(path: Path, summary: dict) -> None:
    """summary.json, or a warning when the disk cannot take it (the console line below still says it all)."""
    try:
        atomic_write_json(path, summary)
    except OSError as error:
        warn(f"{path}: not written ({error.strerror or error})")


def source_labels(named: list[tuple[str | None, str]]) -> list[str]:
    """What the records, the page, MQTT and file names call each source: its name (--source NAME=…, or in the
    line config), else its text with a URL's password as ***, with #2, #3… when one is given twice. Two sources
    of one name are refused."""
    names = [name for name, _ in named if name]
    if len(set(names)) < len(names):
        raise InspectError(f"two sources are named {next(n for n in names if names.count(n) > 1)!r}: give each its "
                           "own name")
    labels = []
    for name, text in named:
        label = name or shown_url(text)
        repeats = labels.count(label) + sum(1 for earlier in labels if earlier.startswith(f"{label}#"))
        labels.append(label if not repeats else f"{label}#{repeats + 1}")
    return labels


def main():
    app()
