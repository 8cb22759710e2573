"""Who may see the operator's page: beyond loopback every route needs the token (a Bearer header, or the cookie
of a sign-in on the page), failed sign-ins are limited, a loopback page answers to loopback names only, slow
clients cannot hold the connections, and odd requests are answered without a traceback. Real HTTP clients
against a real LiveView; the page itself signed in and shown in headless Chromium."""

import http.client
import os
import socket
import stat
import time
import urllib.parse

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.runtime.commands.run import app as run_app
from edgeinspect.runtime.outputs.live_view import LiveView, LiveViewSink
from edgeinspect.runtime.outputs.sinks import Inspected
from edgeinspect.runtime.outputs.view_access import load_or_create_token

from test_operator_page import chromium, page  # noqa: F401 (fixture)

ROUTES = ("/", "/stats.json", "/frame.jpg", "/frame/0.jpg", "/ng/1.jpg", "/stream.mjpg")
TOKEN = "a-long-enough-test-token-0123456789"


def outward_address() -> str:
    """This machine's address on its network (not loopback), to call the view from "another address"."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("no network address besides loopback")
    return address


def request(port: int, path: str, method: str = "GET", headers: dict | None = None, body: str | None = None,
            host: str = "127.0.0.1") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    response.body = response.read(2000) if path != "/stream.mjpg" or response.status != 200 else b""
    connection.close()
    return response


def view_with_a_frame(host: str, token: str | None) -> tuple[LiveView, int]:
    view = LiveView(host, 0, token=token)
    sink = LiveViewSink(view, lambda: {"frames": 1})
    frame = np.full((64, 64, 3), 128, np.uint8)
    sink.handle(Inspected({"seq": 0, "frame": 0, "name": "0", "source": "cam", "score": 1.0, "verdict": "NG",
                           "threshold": 0.5, "regions": []}, frame, np.zeros((64, 64), np.float32), 0.5))
    return view, view.server.server_address[1]


def test_beyond_loopback_every_route_needs_the_token(tmp_path):
    address = outward_address()
    view, port = view_with_a_frame("0.0.0.0", TOKEN)
    try:
        for path in ROUTES:
            response = request(port, path, host=address)
            assert response.status == 401, path
            assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert b"<form" in request(port, "/", host=address).body  # the page offers its sign-in form
        wrong = request(port, "/stats.json", headers={"Authorization": "Bearer not-the-token"}, host=address)
        assert wrong.status == 401
        for path in ("/", "/stats.json", "/frame.jpg", "/frame/0.jpg"):
            assert request(port, path, headers={"Authorization": f"Bearer {TOKEN}"}, host=address).status == 200
    finally:
        view.close()


def test_signing_in_sets_a_session_cookie_and_failures_are_limited(tmp_path):
    address = outward_address()
    view, port = view_with_a_frame("0.0.0.0", TOKEN)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        signed = request(port, "/login", "POST", form, urllib.parse.urlencode({"token": TOKEN}), host=address)
        assert signed.status == 303 and signed.getheader("Location") == "/"
        cookie = signed.getheader("Set-Cookie")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        session = {"Cookie": cookie.split(";")[0]}
        assert request(port, "/stats.json", headers=session, host=address).status == 200
        assert request(port, "/stats.json", headers={"Cookie": "edge_inspect_session=99999999999.forged"},
                       host=address).status == 401
        outcomes = [request(port, "/login", "POST", form, "token=guess", host=address).status for _ in range(6)]
        assert outcomes == [401] * 5 + [429]
        limited = request(port, "/login", "POST", form, urllib.parse.urlencode({"token": TOKEN}), host=address)
        assert limited.status == 429  # even the right token, for the rest of the minute, from that address
    finally:
        view.close()


def test_the_token_file_is_created_owner_only_and_reused(tmp_path):
    path = tmp_path / "view-token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    os.chmod(path, 0o644)
    from edgeinspect.runtime.console import InspectError
    with pytest.raises(InspectError, match="readable by others"):
        load_or_create_token(path)


def test_a_loopback_page_answers_to_loopback_names_only():
    """No token on loopback, as before; a request naming another host (a page elsewhere whose name was pointed at
    127.0.0.1: DNS rebinding) is refused."""
    view, port = view_with_a_frame("127.0.0.1", None)
    try:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert request(port, "/stats.json", headers={"Host": host}).status == 200
        assert request(port, "/stats.json", headers={"Host": f"attacker.example:{port}"}).status == 403
        assert request(port, "/", headers={"Host": "attacker.example"}).status == 403
    finally:
        view.close()


def test_clients_that_trickle_bytes_cannot_lock_the_operators_out():
    """Eight connections each sending a byte every second hold every slot; within the 5 s header deadline they
    are closed, and the page answers again."""
    view, port = view_with_a_frame("127.0.0.1", None)
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        started = time.monotonic()
        answered = None
        while time.monotonic() - started < 15 and answered is None:
            for connection in slow:
                try:
                    connection.send(b"G")
                except OSError:
                    pass
            try:
                if request(port, "/stats.json").status == 200:
                    answered = time.monotonic() - started
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(1.0)
        assert answered is not None and answered < 8, answered
    finally:
        for connection in slow:
            connection.close()
        view.close()


def test_odd_requests_get_an_answer_not_a_traceback(capfd):
    view, port = view_with_a_frame("127.0.0.1", None)
    try:
        assert request(port, "/frame/%C2%B2.jpg").status == 404
        assert request(port, "/frame/" + "9" * 5000 + ".jpg").status in (404, 414)
        assert request(port, "/login", "POST", {"Content-Length": "99999999"}).status == 413
        hang_up = socket.create_connection(("127.0.0.1", port))
        hang_up.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
        hang_up.close()  # gone before the reply
        time.sleep(1.5)
        assert request(port, "/stats.json").status == 200
    finally:
        view.close()
    assert "Traceback" not in capfd.readouterr().err


def test_an_empty_view_host_is_refused(patchcore_bundle, mvtec_like, tmp_path):
    result = CliRunner().invoke(run_app, [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "good"),
                                          "--view", "0", "--view-host", "", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--view-host '': give an address" in result.output


def test_the_page_from_another_address_signs_in_and_shows_the_line(chromium, tmp_path):
    """Headless Chromium opens the page by the machine's network address: the sign-in form (401), then, signed
    in, the operator's page with its tile and the frame."""
    address = outward_address()
    view, port = view_with_a_frame("0.0.0.0", TOKEN)
    try:
        with page(chromium, f"http://{address}:{port}/") as tools:
            assert tools.evaluate("document.title") == "edge-inspect · sign in"
            tools.evaluate(f"document.getElementById('token').value = {TOKEN!r}; document.forms[0].submit(); 1")
            tools.wait_for("document.title === 'edge-inspect · line' && document.readyState === 'complete'",
                           what="the operator's page after signing in")
            tools.wait_for("document.querySelectorAll('#tiles .tile').length === 1", what="the source's tile")
            tools.errors = [e for e in tools.errors if "status of 401" not in e]  # the sign-in page's own answer
            tools.screenshot(tmp_path / "signed-in.png")
    finally:
        view.close()
