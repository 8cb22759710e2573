"""Who may see the operator's page and its routes (--view).

- Listening on loopback without a token: open, as a page for the box's own screen; the Host header must then name
  the loopback too (a web page elsewhere cannot reach it by pointing its own name at 127.0.0.1: DNS rebinding).
- Listening beyond loopback, or with `--view-token-file`: every route needs the token, as an `Authorization: Bearer`
  header (scripts) or a session cookie set by signing in on the page (POST /login), valid 12 hours and for this
  run only. A token file that does not exist is created with a random token, readable by its owner alone.
- Failed sign-ins are limited per client address (429 beyond LOGIN_FAILURES a minute)."""

import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from edgeinspect.runtime.console import InspectError

COOKIE = "edge_inspect_session"
SESSION_S = 12 * 3600
LOGIN_FAILURES = 5  # per client address and minute
TOKEN_FILE = "view-token"  # in --out, where a view beyond loopback keeps its token unless told otherwise


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_view_host(host: str) -> str:
    if not host.strip():
        raise InspectError("--view-host '': give an address (127.0.0.1 for this box only, 0.0.0.0 for every "
                           "interface, which needs a token)")
    return host


def load_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there (mode 0600) when the file does not exist."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise InspectError(f"--view-token-file {path}: unreadable ({getattr(error, 'strerror', None) or error})"
                               ) from None
        if len(token) < 16:
            raise InspectError(f"--view-token-file {path}: the token must be at least 16 characters")
        if path.stat().st_mode & 0o077:
            raise InspectError(f"--view-token-file {path}: readable by others (chmod 600 {path})")
        return token
    except OSError as error:
        raise InspectError(f"--view-token-file {path}: cannot create it ({error.strerror or error})") from None
    token = secrets.token_urlsafe(24)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token


class ViewAccess:
    def __init__(self, token: str | None):
        self.token = token
        self.session_key = secrets.token_bytes(32)  # sessions end with the run
        self.failures: dict[str, deque] = {}
        self.lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self.token is None

    def host_allowed(self, host_header: str | None) -> bool:
        """Without a token only loopback names reach the page (with a token, the token decides). Browsers always
        send Host; a request without one (HTTP/1.0 from a script) is not a rebound page."""
        if not self.open or host_header is None:
            return True
        host = (host_header or "").rsplit(":", 1)[0] if not (host_header or "").endswith("]") else host_header
        return is_loopback(host or "")

    def session(self, now: float | None = None) -> str:
        expiry = int((now or time.time()) + SESSION_S)
        return f"{expiry}.{self._signature(expiry)}"

    def _signature(self, expiry: int) -> str:
        return hmac.new(self.session_key, f"session:{expiry}".encode(), hashlib.sha256).hexdigest()

    def _valid_session(self, value: str) -> bool:
        expiry, _, signature = value.partition(".")
        if not expiry.isascii() or not expiry.isdigit() or len(expiry) > 12 or int(expiry) < time.time():
            return False
        return hmac.compare_digest(signature, self._signature(int(expiry)))

    def authorized(self, headers) -> bool:
        if self.open:
            return True
        scheme, _, credential = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self.token.encode()):
            return True
        for part in (headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and self._valid_session(value):
                return True
        return False

    def sign_in(self, token: str, client: str) -> str:
        """'ok', 'wrong' or 'limited' (too many failures from this client in the last minute)."""
        now = time.monotonic()
        with self.lock:
            failures = self.failures.setdefault(client, deque())
            while failures and now - failures[0] > 60:
                failures.popleft()
            if len(failures) >= LOGIN_FAILURES:
                return "limited"
            if not self.open and hmac.compare_digest(token.encode(), self.token.encode()):
                return "ok"
            failures.append(now)
            return "wrong"
