"""--view: the annotated stream and the running statistics over HTTP, for a headless box on the line.

    /             a small page: the latest annotated frame (refreshed) and the statistics
    /stream.mjpg  the annotated frames as an MJPEG stream (VLC, ffplay, browsers)
    /frame.jpg    the latest annotated frame
    /stats.json   frames, NG, dropped, fps, latency percentiles
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2

from .console import InspectError
from .sinks import Inspected, Sink

PAGE = b"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>edge-inspect live</title>
<style>body{font-family:sans-serif;margin:1em;background:#111;color:#eee}img{max-width:100%;border:1px solid #444}
#verdict{font-size:2em;font-weight:bold}</style></head><body><h1>edge-inspect live view</h1>
<div id="verdict">waiting for frames</div><img id="frame" alt="latest annotated frame"><pre id="stats"></pre>
<script>
const frame = document.getElementById('frame');
frame.onload = () => { document.body.dataset.frameWidth = frame.naturalWidth; };
async function refresh() {
  try {
    const stats = await (await fetch('/stats.json', {cache: 'no-store'})).json();
    document.getElementById('stats').textContent = JSON.stringify(stats, null, 1);
    document.getElementById('verdict').textContent = stats.last ? stats.last.verdict + ' ' + stats.last.score : '';
    document.body.dataset.frames = stats.frames;
    if (stats.frames) frame.src = '/frame.jpg?' + stats.frames;
  } catch (error) { document.getElementById('verdict').textContent = 'connection lost'; }
  setTimeout(refresh, 500);
}
refresh();
</script></body></html>"""


class BoundedServer(ThreadingHTTPServer):
    """At most `max_clients` connections served at once (each holds a thread and a file descriptor; an MJPEG
    viewer holds them for as long as it watches): one more is answered 503 and closed at once."""

    daemon_threads = True

    def __init__(self, address, handler, max_clients: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_clients)

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
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class LiveView:
    """Holds the latest annotated JPEG and statistics; serves them from daemon threads, to at most
    `max_clients` viewers at once, each connection dropped after `timeout_s` without progress."""

    def __init__(self, host: str, port: int, max_clients: int = 8, timeout_s: float = 10.0):
        self.condition = threading.Condition()
        self.jpeg: bytes | None = None
        self.stats: dict = {"frames": 0}
        view = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # an idle or stalled client gives its slot back

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/":
                    self._send(PAGE, "text/html; charset=utf-8")
                elif path == "/stats.json":
                    with view.condition:
                        body = json.dumps(view.stats).encode()
                    self._send(body, "application/json")
                elif path == "/frame.jpg" and view.jpeg is not None:
                    self._send(view.jpeg, "image/jpeg")
                elif path == "/stream.mjpg":
                    self._stream()
                else:
                    self.send_error(404)

            def _send(self, body: bytes, content_type: str):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                last = None
                while not view.closed:
                    with view.condition:
                        view.condition.wait_for(lambda: view.jpeg is not last or view.closed, timeout=1.0)
                        jpeg = last = view.jpeg
                    if jpeg is None:
                        continue
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpeg) + jpeg + b"\r\n")
                    except OSError:  # gone, reset, or too slow to take a frame within the timeout
                        return

        self.closed = False
        try:
            self.server = BoundedServer((host, port), Handler, max_clients)
        except (OSError, OverflowError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise InspectError(f"--view {port} --view-host {host}: cannot listen there ({reason})") from None
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, name="live-view", daemon=True).start()

    def publish(self, jpeg: bytes, stats: dict) -> None:
        with self.condition:
            self.jpeg, self.stats = jpeg, dict(stats, updated=time.time())
            self.condition.notify_all()

    def close(self) -> None:
        self.closed = True
        with self.condition:
            self.condition.notify_all()
        self.server.shutdown()
        self.server.server_close()


class LiveViewSink(Sink):
    """Feeds the live view at most 10 annotated frames a second (the overlay drawn only then, or reused when
    the overlay store drew it), with the run's statistics."""

    INTERVAL_S = 0.1

    def __init__(self, view: LiveView, stats):
        self.view, self.stats = view, stats
        self.last = 0.0

    def handle(self, item: Inspected) -> None:
        if item.skipped or time.perf_counter() - self.last < self.INTERVAL_S:
            return
        self.last = time.perf_counter()
        record = item.record
        stats = dict(self.stats(), last={"name": record["name"], "source": record.get("source"),
                                         "verdict": record.get("verdict") or "-", "score": round(record["score"], 4)})
        self.view.publish(cv2.imencode(".jpg", item.overlay())[1].tobytes(), stats)

    def close(self) -> None:
        self.view.close()
