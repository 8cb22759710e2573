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


class LiveView:
    """Holds the latest annotated JPEG and statistics; serves them from a daemon thread."""

    def __init__(self, host: str, port: int):
        self.condition = threading.Condition()
        self.jpeg: bytes | None = None
        self.stats: dict = {"frames": 0}
        view = self

        class Handler(BaseHTTPRequestHandler):
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
                    except (BrokenPipeError, ConnectionResetError):
                        return

        self.closed = False
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
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
