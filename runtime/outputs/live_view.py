"""--view: the operator's page for the line, served by the box itself (one document, its HTML, CSS and
JavaScript from operator_page/ inlined: no build step, nothing fetched from the internet), and the annotated
stream and statistics for tools.

    /             the page: per source the current verdict (OK green, NG red, grey without calibration), the score
                  against the threshold as a bar, counters since start and for the last hour (inspected, NG,
                  yield, frames/s, dropped, reconnects), the score trend of the last 5 minutes with the threshold,
                  the latest annotated frame; the health alarms; the last NG frames (click: the whole overlay and
                  its regions); bundle and backend. It polls /stats.json twice a second, fetches the live
                  picture once a second, and any other image only when its id changed.
    /stats.json   what the page shows (LiveViewSink.snapshot; computed at most 4 times a second whatever the
                  number of viewers)
    /frame.jpg    the latest annotated frame of any source; /frame/N.jpg the latest of source N (0, 1, ...)
    /ng/ID.jpg    one of the last NG frames, annotated (an id never changes its image: cacheable)
    /stream.mjpg  the annotated frames as an MJPEG stream (VLC, ffplay, browsers)

The frame loop only hands over references (at most 10 frames a second of all sources together; NG frames in
bursts of 4, else 2 a second) and keeps per-second score buckets; overlays are drawn and JPEG-encoded when a viewer asks, once per
frame however many ask, on the server's threads. A page nobody watches costs the frame loop next to nothing.
"""

import json
import math
import socket
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
from edgeinspect.runtime.console import InspectError, RateLimitedWarning
from edgeinspect.runtime.inference.regions import heat_overlay
from edgeinspect.runtime.outputs.labels import LABELS, LabelStore, TeachJob, json_body
from edgeinspect.runtime.outputs.run_log import json_line
from edgeinspect.runtime.outputs.sinks import Inspected, Sink
from edgeinspect.runtime.outputs.view_access import COOKIE, SESSION_S, ViewAccess

PAGE_FILES = "operator_page"  # page.html with its page.css and page.js, package data beside this module


def page_file(name: str) -> bytes:
    return (resources.files("edgeinspect.runtime.outputs") / PAGE_FILES / name).read_bytes()


def operator_page() -> bytes:
    """The operator's page as one document: page.html with page.css and page.js inlined where it links them (the
    files stay a page an editor and a browser open as they are; the box serves one response, nothing else)."""
    folder = resources.files("edgeinspect.runtime.outputs") / PAGE_FILES
    html = (folder / "page.html").read_text(encoding="utf-8")
    for tag, name, inline in (('<link rel="stylesheet" href="page.css">', "page.css", "<style>\n{}</style>"),
                              ('<script src="page.js"></script>', "page.js", "<script>\n{}</script>")):
        if html.count(tag) != 1:
            raise RuntimeError(f"{PAGE_FILES}/page.html must link {name} once, as {tag}")
        html = html.replace(tag, inline.format((folder / name).read_text(encoding="utf-8")))
    return html.rstrip("\n").encode()


class FrameImage:
    """One frame to show: the overlay is drawn (unless the overlay store drew it already) and JPEG-encoded on
    the first request, once, however many viewers ask; then only the JPEG is kept. `max_side`: a larger frame
    is shrunk first (live frames: the page shows them small, and a full-size overlay of a 1920×1080 frame
    costs tens of ms); `quality`: JPEG quality."""

    def __init__(self, item: Inspected, max_side: int | None = None, quality: int = 95):
        self.lock = threading.Lock()
        self.jpeg_bytes: bytes | None = None
        self.max_side, self.quality = max_side, quality
        self.overlay = item._overlay  # drawn already by an earlier sink (the overlay store): reused
        self.rgb = item.rgb if self.overlay is None else None
        self.anomaly_map = np.array(item.anomaly_map) if self.overlay is None else None  # a copy: never a backend buffer
        self.threshold = item.pixel_threshold

    def jpeg(self) -> bytes:
        with self.lock:
            if self.jpeg_bytes is None:
                overlay = self.overlay
                if overlay is None:
                    rgb = self.rgb
                    if self.max_side and max(rgb.shape[:2]) > self.max_side:
                        scale = self.max_side / max(rgb.shape[:2])
                        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
                        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
                    overlay = heat_overlay(rgb, self.anomaly_map, self.threshold)
                self.jpeg_bytes = cv2.imencode(".jpg", overlay, [cv2.IMWRITE_JPEG_QUALITY, self.quality])[1].tobytes()
                self.overlay = self.rgb = self.anomaly_map = None
            return self.jpeg_bytes


class BoundedServer(ThreadingHTTPServer):
    """At most `max_clients` connections served at once (each holds a thread and a file descriptor; an MJPEG
    viewer holds them for as long as it watches): one more is answered 503 and closed at once. A connection that
    has not sent its request's headers within HEADER_DEADLINE_S is closed, so clients that trickle a byte every
    few seconds cannot hold the slots for long."""

    daemon_threads = True
    HEADER_DEADLINE_S = 5.0

    def __init__(self, address, handler, max_clients: int):
        self.slots = threading.BoundedSemaphore(max_clients)
        self.lock = threading.Lock()
        self.waiting_headers: dict[socket.socket, float] = {}
        self.closing = threading.Event()
        super().__init__(address, handler)  # binds (and closes itself again when that fails)
        threading.Thread(target=self._close_slow_requests, name="live-view-deadline", daemon=True).start()

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 31\r\nConnection: close\r\n\r\ntoo many viewers, try again later")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self.lock:
            self.waiting_headers[request] = time.monotonic() + self.HEADER_DEADLINE_S
        super().process_request(request, client_address)

    def headers_received(self, request) -> None:
        with self.lock:
            self.waiting_headers.pop(request, None)

    def _close_slow_requests(self) -> None:
        while not self.closing.wait(0.5):
            now = time.monotonic()
            with self.lock:
                late = [request for request, deadline in self.waiting_headers.items() if deadline < now]
                for request in late:
                    del self.waiting_headers[request]
            for request in late:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.headers_received(request)
            self.slots.release()

    def handle_error(self, request, client_address):
        """A client that hangs up or stalls is its own business; anything else is one warning line a minute."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            self.warn("live-view", f"live view: a request failed ({type(error).__name__}: {error})")

    def server_close(self):
        self.closing.set()
        super().server_close()


class LiveView:
    """Holds the latest frame of each source, the last NG frames and a function that builds the statistics
    (`snapshot`, set by LiveViewSink); serves them from daemon threads, to at most `max_clients` viewers at once,
    each connection dropped after `timeout_s` without progress."""

    STATS_FRESH_S = 0.25  # /stats.json is rebuilt at most this often, however many viewers poll
    NG_SHOWN, NG_KEPT = 8, 16  # the page lists 8; twice that are kept so a listed one is still there when asked

    def __init__(self, host: str, port: int, max_clients: int = 8, timeout_s: float = 10.0,
                 token: str | None = None, labels: LabelStore | None = None, teaching: TeachJob | None = None):
        """`labels` and `teaching`: the operator may label NG frames and start teaching from the page."""
        self.access = ViewAccess(token)
        self.labels, self.teaching = labels, teaching
        self.condition = threading.Condition()
        self.version = 0
        self.latest: tuple[int, FrameImage] | None = None
        self.frames: dict[int, tuple[int, FrameImage]] = {}
        # the NG strip: description, image, and the frame as received (for labelling; NG_KEPT frames at most)
        self.ng: deque[tuple[dict, FrameImage, np.ndarray | None]] = deque(maxlen=self.NG_KEPT)
        self.snapshot = lambda: {"frames": 0}
        self.stats_lock = threading.Lock()
        self.stats_cache: tuple[float, bytes] = (-math.inf, b"")
        self.warn = RateLimitedWarning()
        self.closed = False
        self.page = operator_page()
        self.login_page = page_file("login.html")
        view = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # an idle or stalled client gives its slot back

            def log_message(self, *args):
                pass

            def parse_request(self):
                parsed = super().parse_request()
                view.server.headers_received(self.request)
                return parsed

            def do_GET(self):
                path = urlsplit(self.path).path
                if not self._admitted(path):
                    return
                if path == "/":
                    self._send(view.page, "text/html; charset=utf-8")
                elif path == "/stats.json":
                    body = view.stats_json()
                    if body is None:
                        self.send_error(500, "statistics unavailable")
                    else:
                        self._send(body, "application/json")
                elif path == "/stream.mjpg":
                    self._stream()
                elif (image := view.image(path)) is not None:
                    self._send(image.jpeg(), "image/jpeg", cacheable=path.startswith("/ng/"))
                else:
                    self.send_error(404)

            def do_POST(self):
                """POST /login with the form's token; /label and /teach (signed in, JSON) from the NG strip."""
                path = urlsplit(self.path).path
                if path == "/login":
                    self._sign_in()
                elif path in ("/label", "/teach") and view.labels is not None:
                    if not self._admitted(path):
                        return
                    if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                        self.send_error(415, "send application/json")  # which a form of another site cannot
                        return
                    raw = self._body()
                    body = None if raw is None else json_body(raw)
                    if raw is not None and body is None:
                        self.send_error(400, "a JSON object, please")
                    elif body is not None:
                        status, answer = view.label(body) if path == "/label" else view.start_teaching()
                        self._send(json.dumps(answer).encode(), "application/json", status=status)
                else:
                    self.send_error(404)

            def _body(self) -> bytes | None:
                length = self.headers.get("Content-Length") or ""
                if not (length.isascii() and length.isdigit() and int(length) <= 4096):
                    self.send_error(413 if length.isdigit() else 411)
                    return None
                return self.rfile.read(int(length))

            def _sign_in(self):
                """The form's token: a session cookie and back to the page."""
                if not view.access.host_allowed(self.headers.get("Host")):
                    self.send_error(403)
                    return
                raw = self._body()
                if raw is None:
                    return
                form = parse_qs(raw.decode("utf-8", "replace"))
                outcome = view.access.sign_in(form.get("token", [""])[0], self.client_address[0])
                if outcome == "ok":
                    self.send_response(303)
                    self.send_header("Location", "/")
                    self.send_header("Set-Cookie", f"{COOKIE}={view.access.session()}; Path=/; Max-Age={SESSION_S}; "
                                                   "HttpOnly; SameSite=Strict")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif outcome == "limited":
                    self._send(b"too many failed sign-ins; try again in a minute", "text/plain", status=429)
                else:
                    self._login(401, "wrong token")

            def _admitted(self, path: str) -> bool:
                if not view.access.host_allowed(self.headers.get("Host")):
                    self.send_error(403, "this page answers to its own address only")
                    return False
                if view.access.authorized(self.headers):
                    return True
                if path == "/":
                    self._login(401, "")
                else:
                    self._send(b"sign in on the page, or send Authorization: Bearer TOKEN", "text/plain", status=401)
                return False

            def _login(self, status: int, message: str):
                self._send(view.login_page.replace(b"{message}", message.encode()), "text/html; charset=utf-8",
                           status=status)

            def _send(self, body: bytes, content_type: str, cacheable: bool = False, status: int = 200):
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="edge-inspect"')
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "max-age=86400, immutable" if cacheable else "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                last = None
                while not view.closed:
                    with view.condition:
                        view.condition.wait_for(lambda: view.latest is not last or view.closed, timeout=1.0)
                        latest = last = view.latest
                    if latest is None:
                        continue
                    jpeg = latest[1].jpeg()
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpeg) + jpeg + b"\r\n")
                    except OSError:  # gone, reset, or too slow to take a frame within the timeout
                        return

        try:
            self.server = BoundedServer((host, port), Handler, max_clients)
        except (OSError, OverflowError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise InspectError(f"--view {port} --view-host {host}: cannot listen there ({reason})") from None
        self.server.warn = self.warn
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        # polled every 0.1 s for shutdown (the default 0.5 s held the end of every run up by that much)
        threading.Thread(target=self.server.serve_forever, args=(0.1,), name="live-view", daemon=True).start()

    def show(self, index: int, image: FrameImage) -> int:
        """Make `image` the latest frame of source `index`; returns its version (the id the page asks for)."""
        with self.condition:
            self.version += 1
            self.frames[index] = self.latest = (self.version, image)
            self.condition.notify_all()
            return self.version

    def add_ng(self, meta: dict, image: FrameImage, rgb: np.ndarray | None = None) -> None:
        with self.condition:
            self.ng.append((meta, image, rgb if self.labels is not None else None))

    def ng_frames(self) -> list[dict]:
        """The last NG_SHOWN NG frames' descriptions, newest first."""
        with self.condition:
            return [dict(meta) for meta, _, _ in reversed(self.ng)][:self.NG_SHOWN]

    def label(self, body: dict) -> tuple[int, dict]:
        """POST /label {"id", "label"}: the NG frame saved under its label."""
        label, frame_id = body.get("label"), body.get("id")
        if label not in LABELS:
            return 400, {"error": f"label must be one of {', '.join(LABELS)}"}
        with self.condition:
            kept = next(((meta, rgb) for meta, _, rgb in self.ng if meta["id"] == frame_id and rgb is not None), None)
        if kept is None:
            return 404, {"error": f"frame {str(frame_id)[:80]!r} is no longer kept (the last {self.NG_KEPT} NG frames "
                                  "are)"}
        meta, rgb = kept
        try:
            path = self.labels.save(meta, rgb, label)
        except OSError as error:
            return 507, {"error": f"not saved: {error.strerror or error}"}
        meta["label"] = label
        return 200, {"saved": path.name, "label": label, "labels": dict(self.labels.counts)}

    def start_teaching(self) -> tuple[int, dict]:
        """POST /teach: teaching on the frames marked good starts (one at a time)."""
        started, state = self.teaching.start()
        return (202 if started else 409), state

    def image(self, path: str) -> FrameImage | None:
        with self.condition:
            if path == "/frame.jpg":
                return self.latest[1] if self.latest else None
            name = path.rsplit("/", 1)[-1].removesuffix(".jpg")
            number = name.isascii() and name.isdigit() and len(name) <= 9  # not '²', not 5,000 digits
            if path.startswith("/frame/") and number and int(name) in self.frames:
                return self.frames[int(name)][1]
            if path.startswith("/ng/"):
                return next((image for meta, image, _ in self.ng if meta["id"] == name), None)
        return None

    def stats_json(self) -> bytes | None:
        """The statistics as JSON (strict: a non-finite number becomes null), rebuilt at most every
        STATS_FRESH_S; None when building them failed (said at most once a minute)."""
        with self.stats_lock:
            made, body = self.stats_cache
            if time.monotonic() - made >= self.STATS_FRESH_S:
                try:
                    snapshot = self.snapshot()
                    try:
                        body = json.dumps(snapshot, allow_nan=False).encode()
                    except ValueError:  # a non-finite number somewhere: the log's strict writer makes it null
                        body = json_line(snapshot)
                except Exception as error:  # noqa: BLE001 - the page says so; the run goes on
                    self.warn("stats", f"live view: statistics failed: {type(error).__name__}: {error}")
                    return None
                self.stats_cache = (time.monotonic(), body)
            return body

    def close(self) -> None:
        self.closed = True
        with self.condition:
            self.condition.notify_all()
        self.server.shutdown()
        self.server.server_close()


def about_run(bundle_dir: Path, bundle, backend: str, run_id: str, mode: str) -> dict:
    """What the page's header says: the bundle (named by its run folder when the folder is called 'bundle'),
    model kind, input size, backend, run, mode and where the threshold came from."""
    bundle_dir = Path(bundle_dir)
    name = bundle_dir.resolve().parent.name if bundle_dir.resolve().name == "bundle" else bundle_dir.name
    thresholds = bundle.thresholds or {}
    return {"bundle": name, "bundle_path": str(bundle_dir), "model": bundle.record.get("model", "?"),
            "input_size": list(bundle.input_size), "backend": backend, "run": run_id, "mode": mode,
            "calibrated": bool(thresholds), "calibrated_on": thresholds.get("source"),
            "threshold": thresholds.get("image", {}).get("threshold"),
            "version": (bundle.record.get("version") or {}).get("number", 1)}


COUNTS = ("frames", "ng", "skipped", "dropped", "reconnects")


class Tile:
    """One source's page state, kept by the frame loop: its last verdict, per-second score buckets for the
    trend ([second, min, max, NG count]) and the version of its latest frame shown."""

    def __init__(self, index: int, label: str, seconds: int):
        self.index, self.label = index, label
        self.last: dict | None = None
        self.trend: deque[list] = deque(maxlen=seconds)
        self.shown_at = -math.inf
        self.version = 0


class CounterHistory:
    """The cumulative counters every `every_s`, for a little over `span_s`: "last hour" is now minus the
    newest mark at least an hour old (or the run's start, in its first hour)."""

    def __init__(self, start: float, every_s: float = 10.0, span_s: float = 3600.0):
        self.every_s, self.span_s = every_s, span_s
        self.marks: deque[tuple[float, dict]] = deque([(start, {})])
        self.lock = threading.Lock()

    def due(self, now: float) -> bool:
        return now - self.marks[-1][0] >= self.every_s

    def add(self, now: float, counts: dict) -> None:
        with self.lock:
            if now - self.marks[-1][0] >= self.every_s:
                self.marks.append((now, counts))
            while len(self.marks) > 1 and self.marks[1][0] <= now - self.span_s:
                self.marks.popleft()

    def baseline(self) -> tuple[float, dict]:
        with self.lock:
            return self.marks[0]


class LiveViewSink(Sink):
    """Feeds the live view: per record a few counters and the trend bucket (O(1)); at most FRAME_INTERVAL_S
    apart (per source: that times the number of sources) a reference to the frame as the latest, and NG frames
    for the strip (bursts of NG_BURST, else NG_PER_S a second). `summary` is the run's summary function (latency
    percentiles, called at most every 2 s from a server thread), `stats` its LatencyStats and `grabbers` its
    grabbers (counters read, never changed), `health` its Health (alarms), `about` from about_run()."""

    FRAME_INTERVAL_S = 0.1
    LIVE_SIDE, LIVE_QUALITY = 640, 80  # live frames (NG frames keep their size: the page shows them whole)
    NG_PER_S, NG_BURST = 2.0, 4  # NG frames for the strip: bursts of up to 4, else 2 a second
    TREND_S = 300
    SUMMARY_FRESH_S = 2.0

    def __init__(self, view: LiveView, summary, stats=None, grabbers=(), health=None, about: dict | None = None,
                 plc=None):
        self.view, self.summary, self.stats, self.health = view, summary, stats, health
        self.plc = plc  # the servers the PLC reads (their status() for the footer), or None
        self.grabbers = list(grabbers)
        self.about = about or {}
        self.tiles: dict[str, Tile] = {}
        for grabber in self.grabbers:
            self._tile(grabber.label)
        self.ng_tokens, self.ng_refilled = float(self.NG_BURST), time.perf_counter()
        self.started = stats.started if stats is not None else time.perf_counter()
        self.history = CounterHistory(self.started)
        self.summary_lock = threading.Lock()
        self.summary_cache: tuple[float, dict] = (-math.inf, {})
        view.snapshot = self.snapshot

    def _tile(self, label: str) -> Tile:
        if label not in self.tiles:
            self.tiles[label] = Tile(len(self.tiles), label, self.TREND_S)
        return self.tiles[label]

    def handle(self, item: Inspected) -> None:
        record = item.record
        tile = self._tile(record.get("source", ""))
        now = time.perf_counter()
        if self.history.due(now):
            self.history.add(now, self._counts())
        if item.skipped or item.rgb is None:
            return
        score = record.get("score")
        score = score if isinstance(score, (int, float)) and math.isfinite(score) else None
        verdict = record.get("verdict")
        wall = time.time()
        tile.last = {"seq": record.get("seq"), "name": record.get("name"), "verdict": verdict, "score": score,
                     "time": round(wall, 3), "version": record.get("version"), "threshold": record.get("threshold")}
        second, ng = int(wall), int(verdict == "NG")
        bucket = tile.trend[-1] if tile.trend else None
        if bucket is None or bucket[0] != second:
            tile.trend.append([second, score, score, ng])
        else:
            if score is not None:
                bucket[1] = score if bucket[1] is None else min(bucket[1], score)
                bucket[2] = score if bucket[2] is None else max(bucket[2], score)
            bucket[3] += ng
        image = None
        if ng:
            self.ng_tokens = min(self.NG_BURST, self.ng_tokens + (now - self.ng_refilled) * self.NG_PER_S)
            self.ng_refilled = now
        if ng and self.ng_tokens >= 1:
            self.ng_tokens -= 1
            image = FrameImage(item)
            self.view.add_ng({"id": f"{record.get('run', 'run')}-{record.get('seq')}", "seq": record.get("seq"),
                              "source": tile.label, "name": record.get("name"), "score": score,
                              "threshold": record.get("threshold"), "time": round(wall, 3),
                              "iso": record.get("time"), "regions": record.get("regions", [])[:10]}, image,
                             item.rgb)
        if now - tile.shown_at >= self.FRAME_INTERVAL_S * len(self.tiles):
            tile.shown_at = now
            tile.version = self.view.show(tile.index, image or FrameImage(item, self.LIVE_SIDE, self.LIVE_QUALITY))

    def close(self) -> None:
        self.view.close()

    # -- the server's side: called from its threads --------------------------------------------------------

    def _counts(self) -> dict[str, dict]:
        """Cumulative counters per source label (cheap: no percentiles)."""
        per_source = self.stats.per_source if self.stats is not None else {}
        counts = {}
        for label in list(self.tiles):
            found = dict(per_source.get(label) or {})
            counts[label] = {name: found.get(name, 0) for name in COUNTS}
        for grabber in self.grabbers:
            counts.setdefault(grabber.label, dict.fromkeys(COUNTS, 0)).update(
                dropped=grabber.dropped, reconnects=grabber.source.reconnects)
        return counts

    def _figures(self, counts: dict, seconds: float) -> dict:
        calibrated = self.about.get("calibrated", True)
        frames = counts.get("frames", 0)
        return {**{name: counts.get(name, 0) for name in COUNTS},
                "yield": round(100 * (frames - counts.get("ng", 0)) / frames, 2) if frames and calibrated else None,
                "fps": round(frames / max(seconds, 1e-9), 2), "seconds": round(seconds, 3)}

    def _summary(self) -> dict:
        with self.summary_lock:
            made, summary = self.summary_cache
            if time.monotonic() - made >= self.SUMMARY_FRESH_S:
                summary = self.summary()
                self.summary_cache = (time.monotonic(), summary)
            return summary

    def snapshot(self) -> dict:
        """Everything the page shows. Counters are cumulative since the start ("since_start"), and over the
        last hour ("last_hour"), for the whole run (top level) and per source ("sources", in the order of
        --source, each with "index" for /frame/N.jpg, "frame": the version of its latest frame, "last": its
        last verdict, "trend": [seconds before "now", min, max, NG count] per second of the last 5 minutes)."""
        now, wall = time.perf_counter(), time.time()
        counts = self._counts()
        self.history.add(now, counts)
        since, base = self.history.baseline()
        hour_s, start_s = now - since, now - self.started
        total = {name: sum(c[name] for c in counts.values()) for name in COUNTS}
        total_before = {name: sum(c.get(name, 0) for c in base.values()) for name in COUNTS}
        sources = []
        for label, tile in list(self.tiles.items()):
            mine, before = counts.get(label, {}), base.get(label, {})
            trend = [[round(second - wall, 1), low, high, ng] for second, low, high, ng in list(tile.trend)
                     if wall - second <= self.TREND_S]
            sources.append({"index": tile.index, "label": label, "last": tile.last, "frame": tile.version,
                            "since_start": self._figures(mine, start_s),
                            "last_hour": self._figures({k: mine.get(k, 0) - before.get(k, 0) for k in COUNTS}, hour_s),
                            "trend": trend})
        health = self.health.snapshot() if self.health is not None else {"active": [], "cleared": []}
        last = max((s["last"] for s in sources if s["last"]), key=lambda last: last["time"], default=None)
        summary = self._summary()
        return {**summary, **total, "fps": self._figures(total, start_s)["fps"], "now": round(wall, 3),
                "run": self.about.get("run", summary.get("run")), "backend": self.about.get("backend", summary.get("backend")),
                "about": self.about, "calibrated": self.about.get("calibrated", True),
                "threshold": self.about.get("threshold"), "last": last,
                "since_start": self._figures(total, start_s),
                "last_hour": self._figures({k: total[k] - total_before[k] for k in COUNTS}, hour_s),
                "sources": sources, "ng_frames": self.view.ng_frames(),
                "alarms": health["active"], "alarms_cleared": health["cleared"],
                "version": self.about.get("version"),
                "labels": dict(self.view.labels.counts) if self.view.labels is not None else None,
                "teaching": dict(self.view.teaching.state) if self.view.teaching is not None else None,
                "plc": self.plc.status() if self.plc is not None else []}
