"""Health alarms of inspect-run: conditions the person next to the line must act on, each said once when it
starts and once when it ends, with what to do about it.

    ng-rate     NG on far more of a source's last 200 frames than calibration predicts (the model does not fit
                this camera path: compression, light, focus, framing), at least 50 frames seen
    stalled     a live source (camera, stream) that has delivered no frame for 10 s
    reconnects  a live source that reconnected 3 times within 10 minutes
    backlog     --mode every on a live source whose queue stays full for 5 s: the loop is slower than the camera,
                so verdicts lag further and further behind the line
    disk        the disk that holds --out nearly full

An alarm is {"id", "kind", "source", "message", "raised_at", "cleared_at"} (ISO times, UTC; cleared_at null while
it lasts); its id is the kind, with ":SOURCE" when the run has several sources. `Health` sees every record
through `HealthSink` (O(1) per frame; the NG-rate check runs there) and checks the rest once a second on its own
thread. Listeners hear each raise and clear: the JSON log (a line {"time", "run", "alarm": {..., "state"}},
without "seq", which numbers frames only), the console and MQTT's PREFIX/alarms (wired in inspect-run); the live
page and summary.json read `snapshot()` and `alarms()`."""

import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
from edgeinspect.runtime.console import RateLimitedWarning, console, warn
from edgeinspect.runtime.outputs.sinks import Inspected, Sink


@dataclass(frozen=True)
class Limits:
    """When an alarm is raised and when it is cleared (the gap between them keeps it from flapping)."""

    window: int = 200  # frames per source the NG rate is measured over
    min_frames: int = 50  # frames seen before the NG rate is judged
    ng_rate_floor: float = 0.20  # raised above max(floor, factor × expected), at most cap; cleared below half
    ng_rate_factor: float = 50.0
    ng_rate_cap: float = 0.5
    stall_s: float = 10.0
    reconnects: int = 3  # within reconnect_window_s; cleared after a window without any
    reconnect_window_s: float = 600.0
    backlog_s: float = 5.0  # queue full that long: raised; not full that long: cleared
    disk_free_bytes: int = 200_000_000  # nearly full: less free than this or 5% of the disk, whichever is less;
    disk_free_fraction: float = 0.05  # cleared at twice that
    check_s: float = 1.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}"
        count /= 1000
    return f"{count:.0f} TB"


class Health:
    """The alarms of one run. `grabbers`: the run's frame grabbers (their source, queue, dropped counters are
    read, never changed); `mode`: "every" or "latest"; `source_texts`: the --source values, for the commands the
    messages suggest."""

    def __init__(self, thresholds: dict | None, bundle_dir: Path, out: Path, grabbers: list, mode: str,
                 source_texts: list[str] | None = None, limits: Limits = Limits(),
                 disk_usage: Callable = shutil.disk_usage):
        self.thresholds, self.bundle_dir, self.out = thresholds, Path(bundle_dir), Path(out)
        self.grabbers, self.mode, self.limits, self.disk_usage = list(grabbers), mode, limits, disk_usage
        labels = [g.label for g in self.grabbers]
        self.source_texts = dict(zip(labels, source_texts or labels))
        self.several = len(labels) > 1
        self.lock = threading.RLock()
        self.active: dict[str, dict] = {}
        self.history: deque[dict] = deque(maxlen=100)  # every alarm of the run, raised and cleared
        self.listeners: list[Callable[[dict], None]] = []
        self.warn = RateLimitedWarning()
        self.use_thresholds(thresholds)
        started = time.monotonic()
        self.windows = {label: deque(maxlen=limits.window) for label in labels}
        self.ng_in_window = dict.fromkeys(labels, 0)
        self.last_frame = dict.fromkeys(labels, started)
        self.frames_seen = dict.fromkeys(labels, 0)
        self.rate_marks: dict[str, deque] = {label: deque(maxlen=16) for label in labels}  # (time, frames seen)
        self.reconnects_seen = {g.label: g.source.reconnects for g in self.grabbers}
        self.reconnect_times: dict[str, deque] = {label: deque() for label in labels}
        self.full_since: dict[str, float | None] = dict.fromkeys(labels)
        self.free_since: dict[str, float | None] = dict.fromkeys(labels)
        self.probes: list[tuple[str, Callable[[], str | None]]] = []  # (kind, what is wrong or None), per check
        self.stopping = threading.Event()
        self.monitor: threading.Thread | None = None

    # -- what the frame loop tells us (its thread; cheap) --------------------------------------------------------

    def observe(self, record: dict) -> None:
        label = record.get("source", "")
        if label not in self.windows:  # a record of a source we were not told of (tests, tools)
            self.windows[label], self.ng_in_window[label] = deque(maxlen=self.limits.window), 0
            self.rate_marks[label], self.frames_seen[label] = deque(maxlen=16), 0
        self.last_frame[label] = time.monotonic()
        if "skipped" in record:
            return
        self.frames_seen[label] += 1
        verdict = record.get("verdict")
        if verdict is None or self.ng_limit is None:
            return
        window = self.windows[label]
        if len(window) == window.maxlen:
            self.ng_in_window[label] -= window[0]
        ng = verdict == "NG"
        window.append(ng)
        self.ng_in_window[label] += ng
        if len(window) >= self.limits.min_frames:
            self._check_ng_rate(label, self.ng_in_window[label] / len(window), len(window))

    def _check_ng_rate(self, label: str, rate: float, frames: int) -> None:
        alarm_id = self._id("ng-rate", label)
        active = alarm_id in self.active
        if not active and rate > self.ng_limit:
            self._raise(alarm_id, "ng-rate", label, self._ng_rate_message(label, rate, frames))
        elif active and rate < self.ng_limit / 2:
            self._clear(alarm_id)

    def _ng_rate_message(self, label: str, rate: float, frames: int) -> str:
        expected = (f"about {100 * self.expected:.1f}%" if self.expected else
                    f"almost none (0 of {self.calibration_n} good calibration images scored above the threshold)")
        where = f"{label}: " if self.several else ""
        bundle, source = self.bundle_dir, self.source_texts.get(label, label)
        return (f"{where}NG on {100 * rate:.0f}% of the last {frames} frames, where calibration expects {expected}. "
                f"The model may not fit this camera path (compression, light, focus, framing): if these parts are "
                f"good, recalibrate with `inspect-calibrate {bundle} --images DIR` from this camera; save good "
                f"frames into DIR with `inspect-run {bundle} --source {source} --collect-good DIR --collect 50`. "
                f"If the parts really are bad, stop the line.")

    # -- the periodic checks (the monitor thread) ---------------------------------------------------------------

    def start(self) -> None:
        if self.monitor is None:
            self.monitor = threading.Thread(target=self._monitor, name="health", daemon=True)
            self.monitor.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.monitor is not None:
            self.monitor.join(timeout=5)

    def _monitor(self) -> None:
        while not self.stopping.wait(self.limits.check_s):
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 - health checks must never end the run
                self.warn("check", f"health check failed: {type(error).__name__}: {error}")

    def check(self, now: float | None = None) -> None:
        """Stalls, reconnects, backlog and disk; `now` (time.monotonic()) for tests."""
        now = time.monotonic() if now is None else now
        for grabber in self.grabbers:
            if getattr(grabber.source, "live", False):
                self._check_stall(grabber, now)
                self._check_reconnects(grabber, now)
                if self.mode == "every":
                    self._check_backlog(grabber, now)
        self._check_disk()
        for kind, probe in self.probes:
            message = probe()
            if message is None:
                self._clear(kind)
            else:
                self._raise(kind, kind, None, message)

    def _check_stall(self, grabber, now: float) -> None:
        label = grabber.label
        alarm_id, quiet = self._id("stalled", label), now - self.last_frame[label]
        if alarm_id not in self.active and quiet > self.limits.stall_s and not grabber.finished:
            self._raise(alarm_id, "stalled", label,
                        f"no frame from {label} for {quiet:.0f} s: check the camera's power, cable and network "
                        f"(and that nothing else holds it); the run keeps reconnecting by itself")
        elif alarm_id in self.active and quiet <= self.limits.stall_s:
            self._clear(alarm_id)

    def _check_reconnects(self, grabber, now: float) -> None:
        label, times = grabber.label, self.reconnect_times[grabber.label]
        count = grabber.source.reconnects
        times.extend([now] * max(0, count - self.reconnects_seen.get(label, 0)))
        self.reconnects_seen[label] = count
        while times and now - times[0] > self.limits.reconnect_window_s:
            times.popleft()
        alarm_id, minutes = self._id("reconnects", label), self.limits.reconnect_window_s / 60
        if alarm_id not in self.active and len(times) >= self.limits.reconnects:
            self._raise(alarm_id, "reconnects", label,
                        f"{label} reconnected {len(times)} times in the last {minutes:.0f} minutes: the link is "
                        f"unreliable (loose cable or connector, Wi-Fi, PoE budget, a camera that overheats or "
                        f"reboots); frames are lost while it reconnects")
        elif alarm_id in self.active and not times:
            self._clear(alarm_id)

    def _check_backlog(self, grabber, now: float) -> None:
        label = grabber.label
        marks = self.rate_marks[label]
        marks.append((now, self.frames_seen[label]))
        full = len(grabber.queue) >= grabber.queue_size
        self.full_since[label] = (self.full_since[label] or now) if full else None
        self.free_since[label] = None if full else (self.free_since[label] or now)
        alarm_id = self._id("backlog", label)
        if alarm_id not in self.active and full and now - self.full_since[label] >= self.limits.backlog_s:
            first_time, first_count = marks[0]
            fps = (self.frames_seen[label] - first_count) / max(now - first_time, 1e-9)
            capture = getattr(grabber.source, "capture", None)
            camera_fps = capture.get(cv2.CAP_PROP_FPS) if capture is not None else 0
            rate = f"{fps:.1f} frames/s" + (f", below the camera's {camera_fps:.1f}" if camera_fps > 0 else "")
            self._raise(alarm_id, "backlog", label,
                        f"{label}: inspecting {rate}: in --mode every the backlog grows and verdicts come later and "
                        f"later; use --mode latest (inspect the newest frame), a smaller frame (the camera's ROI or "
                        f"binning), --batch 4, or a faster backend")
        elif alarm_id in self.active and not full and now - self.free_since[label] >= self.limits.backlog_s:
            self._clear(alarm_id)

    def _check_disk(self) -> None:
        try:
            usage = self.disk_usage(self.out)
        except OSError:
            return
        low = min(self.limits.disk_free_bytes, self.limits.disk_free_fraction * usage.total)
        if "disk" not in self.active and usage.free < low:
            self._raise("disk", "disk", None,
                        f"disk nearly full: {human_bytes(usage.free)} free of {human_bytes(usage.total)} at "
                        f"{self.out}; once it is full, overlays and log lines wait in memory and are lost if the "
                        f"run stops. Free space, or bound the run folder with --max-disk and --keep-days")
        elif "disk" in self.active and usage.free >= 2 * low:
            self._clear("disk")

    def use_thresholds(self, thresholds: dict | None) -> None:
        """The NG rate the calibration expects, and the NG-rate alarm's limit from it (again for a new version)."""
        image = (thresholds or {}).get("image") or {}
        self.thresholds, self.expected, self.calibration_n = thresholds, image.get("fraction_above"), image.get("n")
        limits = self.limits
        self.ng_limit = (None if self.expected is None else
                         min(max(limits.ng_rate_floor, limits.ng_rate_factor * self.expected), limits.ng_rate_cap))

    def bundle_problem(self, message: str | None) -> None:
        """A new bundle version refused (`message`: why), or taken (None: the alarm clears)."""
        active = self.active.get("bundle")
        if active is not None and active["message"] == message:
            return  # the same refusal, tried again: said once
        self._clear("bundle")  # each other refusal is told, with its own reason
        if message is not None:
            self._raise("bundle", "bundle", None, message)

    # -- raising and clearing --------------------------------------------------------------------------------

    def _id(self, kind: str, label: str) -> str:
        return f"{kind}:{label}" if self.several else kind

    def _raise(self, alarm_id: str, kind: str, source: str | None, message: str) -> None:
        with self.lock:
            if alarm_id in self.active:
                return
            alarm = {"id": alarm_id, "kind": kind, "source": source, "message": message, "raised_at": now_iso(),
                     "cleared_at": None}
            self.active[alarm_id] = alarm
            self.history.append(alarm)
            event = dict(alarm, state="raised")
        self._tell(event)

    def _clear(self, alarm_id: str) -> None:
        with self.lock:
            alarm = self.active.pop(alarm_id, None)
            if alarm is None:
                return
            alarm["cleared_at"] = now_iso()
            event = dict(alarm, state="cleared")
        self._tell(event)

    def _tell(self, event: dict) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as error:  # noqa: BLE001 - one listener's failure does not silence the others
                self.warn(f"listener {listener}", f"alarm not reported: {type(error).__name__}: {error}")

    # -- what the page, the summary and the listeners read ---------------------------------------------------

    def alarms(self) -> list[dict]:
        """Every alarm of the run (the last 100), oldest first: summary.json's "alarms"."""
        with self.lock:
            return [dict(alarm) for alarm in self.history]

    def snapshot(self) -> dict:
        """The alarms now ("active", oldest first) and the last 5 cleared ones, newest first."""
        with self.lock:
            cleared = [dict(a) for a in reversed(self.history) if a["cleared_at"] is not None][:5]
            return {"active": [dict(a) for a in self.active.values()], "cleared": cleared}


def console_listener(event: dict) -> None:
    if event["state"] == "raised":
        warn(f"alarm {event['id']}: {event['message']}")
    else:
        console.print(f"alarm {event['id']} cleared (raised at {event['raised_at']})")


def log_listener(log, run_id: str) -> Callable[[dict], None]:
    """Alarm events as lines of the run's JSON log: {"time", "run", "alarm"}, without the frames' "seq"."""
    return lambda event: log.write({"time": now_iso(), "run": run_id, "alarm": event})


class HealthSink(Sink):
    """Hands every record to `Health` and runs its periodic checks while the run lasts."""

    def __init__(self, health: Health):
        self.health = health
        health.start()

    def handle(self, item: Inspected) -> None:
        self.health.observe(item.record)

    def close(self) -> None:
        self.health.stop()
