"""Supervision by systemd (deploy/edge-inspect@.service, Type=notify): inspect-run says when it is ready, feeds
the watchdog from the frame loop (after each inference call, and while it waits for frames), and says when it
stops. A loop stuck in inference or in a sink stops feeding it, and systemd restarts the service after
WatchdogSec. Without $NOTIFY_SOCKET (not under systemd) every call does nothing.

The protocol is sd_notify(3): datagrams such as "READY=1" to the Unix socket named by $NOTIFY_SOCKET (a path,
or an abstract name written with a leading "@"); $WATCHDOG_USEC is the watchdog's period."""

import os
import socket
import threading
import time


class ServiceNotifier:
    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET")
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        period_s = int(environ.get("WATCHDOG_USEC") or 0) / 1e6
        pid = environ.get("WATCHDOG_PID")
        self.watchdog = period_s > 0 and (pid is None or pid == str(os.getpid()))
        self.every_s = period_s / 4 if period_s else 0.0  # systemd's advice: at most half the period
        self.last_fed = -float("inf")
        self.lock = threading.Lock()
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None

    def notify(self, message: str) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendto(message.encode(), self.address)
        except OSError:  # systemd gone or the socket not ours: supervision is its business, the line goes on
            pass

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def alive(self) -> None:
        """Feed the watchdog (at most every quarter period: the frame loop calls this per inference call)."""
        if not self.watchdog:
            return
        now = time.monotonic()
        with self.lock:
            if now - self.last_fed < self.every_s:
                return
            self.last_fed = now
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
