"""The servers the line's PLC reads (--modbus, --opcua) run in a process of their own, on one asyncio loop.
Measured on the 2-core box (BENCHMARKS.md, "The PLC"): as threads inside inspect-run's process they cost the frame
loop about a fifth of its frames/s once a client polled or subscribed (the GIL, and a thread wake-up per frame
per server); served by another process, the same clients cost it nothing measurable.

inspect-run writes each frame's result (a few numbers, JSON) into a pipe without ever waiting: a message fits in
PIPE_BUF, so a non-blocking write is whole or refused; a refused frame (the server process fell behind by a full
pipe, or ended) is a dropped update, counted and warned, never a delayed frame; a refused alarm or bundle change
is kept and sent before the next message, since it is state the PLC must not miss. Closing the pipe ends the
process: its servers say "Halted" and stop."""

import asyncio
import json
import multiprocessing
import os
import select
import signal
import socket
import struct
import threading
from collections import deque

from edgeinspect.runtime.console import InspectError, RateLimitedWarning, warn
from edgeinspect.runtime.outputs.sinks import Inspected, Sink

HEADER = struct.Struct("<I")
MESSAGE_MAX = select.PIPE_BUF  # a larger write could be split between a full pipe and the next write
KEPT_MAX = 256  # alarm and bundle messages kept while the pipe is full
METHODS = {"frame": "publish", "alarm": "alarm", "bundle": "use_bundle"}


def check_bindable(host: str, port: int, where: str) -> None:
    """The address is this machine's and free: said in one line before the server starts (the server libraries
    only say that listening failed, with a traceback)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise InspectError(f"{where}: cannot listen there ({error.strerror or error})") from None


def bundle_identity(bundle) -> dict:
    """Which version judges: its number and its model's SHA-256."""
    record = bundle.record
    return {"version": int((record.get("version") or {}).get("number", 1)),
            "digest": record["files"][record["model_file"]]["sha256"]}


def frame_result(item: Inspected) -> dict:
    """What the PLC servers need of a frame's record."""
    record = item.record
    return {"source": record.get("source", ""), "seq": int(record.get("seq", 0)), "time": record.get("time"),
            "verdict": "skipped" if item.skipped else (item.verdict or ""), "score": record.get("score"),
            "threshold": record.get("threshold"), "version": int(record.get("version") or 0),
            "regions": len(record.get("regions") or [])}


def _open_server(kind: str, options: dict):
    if kind == "modbus":
        from edgeinspect.runtime.outputs.plc_modbus import ModbusServer

        return ModbusServer(**options)
    from edgeinspect.runtime.outputs.plc_opcua import OpcUaServer

    return OpcUaServer(**options)


def _serve(servers: list[tuple[str, dict]], updates, ready, clients) -> None:
    """The server process. Signals are inspect-run's to act on: it ends this process by closing the pipe."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    asyncio.run(_serve_updates(servers, updates, ready, clients))


async def _serve_updates(servers: list[tuple[str, dict]], updates, ready, clients) -> None:
    opened = []
    try:
        try:
            for kind, options in servers:
                server = _open_server(kind, options)
                await server.start()
                opened.append(server)
        except InspectError as error:
            ready.send(("error", str(error)))
            return
        except Exception as error:  # noqa: BLE001 - said by inspect-run, in one line
            where = f"--{kind} {options.get('address') or options.get('endpoint')}"
            ready.send(("error", f"{where}: the server did not start ({type(error).__name__}: {error})"))
            return
        ready.send(("ready", None))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(os.dup(updates.fileno()), "rb", buffering=0))
        counting = loop.create_task(_count_clients(opened, clients))
        failures = RateLimitedWarning()
        try:
            while True:
                size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
                kind, payload = json.loads(await reader.readexactly(size))
                for server in opened:
                    method = getattr(server, METHODS[kind], None)
                    try:
                        if method is not None:
                            await method(payload)
                    except Exception as error:  # noqa: BLE001 - one server's failure never stops the others
                        failures(type(server).__name__, f"{type(server).__name__} failed: {type(error).__name__}: "
                                                        f"{error}; it goes on")
        except asyncio.IncompleteReadError:  # inspect-run closed its end (or ended): the run is over
            pass
        counting.cancel()
    finally:
        for server in opened:
            try:
                await server.stop()
            except Exception as error:  # noqa: BLE001 - stopping anyway
                warn(f"{type(server).__name__} did not stop cleanly: {type(error).__name__}: {error}")


async def _count_clients(opened: list, clients) -> None:
    while True:
        for index, server in enumerate(opened):
            clients[index] = server.clients
        await asyncio.sleep(0.5)


class PlcServers(Sink):
    """inspect-run's side: `servers` is [(kind, the server's options)], kind "modbus" (plc_modbus.ModbusServer's
    options) or "opcua" (plc_opcua.OpcUaServer's)."""

    def __init__(self, servers: list[tuple[str, dict]], start_timeout_s: float = 60.0):
        context = multiprocessing.get_context("spawn")  # not fork: inspect-run has inference threads running
        self.addresses = [("Modbus", options["address"]) if kind == "modbus" else ("OPC UA", options["endpoint"])
                          for kind, options in servers]
        receiving_updates, self.updates = context.Pipe(duplex=False)
        receiving_ready, sending_ready = context.Pipe(duplex=False)
        self.clients = context.Array("i", len(servers), lock=False)
        self.process = context.Process(target=_serve, name="edge-inspect PLC servers", daemon=True,
                                       args=(servers, receiving_updates, sending_ready, self.clients))
        self.process.start()
        receiving_updates.close()
        sending_ready.close()
        self.warn, self.dropped, self.closed = RateLimitedWarning(), 0, False
        self.kept: deque[bytes] = deque(maxlen=KEPT_MAX)  # alarm and bundle messages not yet through
        self.lock = threading.Lock()  # the frame loop, Health's thread and the hot-swap thread all send
        try:
            answer = receiving_ready.recv() if receiving_ready.poll(start_timeout_s) else ("error", None)
        except EOFError:  # the process ended before it could say why
            answer = ("error", f"the PLC servers' process ended (exit code {self.process.exitcode})")
        if answer[0] != "ready":
            self.close()
            raise InspectError(answer[1] or f"the PLC servers did not start within {start_timeout_s:.0f} s")
        os.set_blocking(self.updates.fileno(), False)

    def status(self) -> list[dict]:
        """For the operator's page: each server's address, how many clients are connected, and whether the
        servers' process still runs."""
        running = self.process.is_alive()
        return [{"protocol": protocol, "address": address, "clients": self.clients[index] if running else 0,
                 "running": running} for index, (protocol, address) in enumerate(self.addresses)]

    def problem(self) -> str | None:
        """For Health's check: the servers' process ended while the run goes on."""
        if self.closed or self.process.is_alive():
            return None
        return (f"the PLC servers' process has ended (exit code {self.process.exitcode}): the PLC gets no verdicts "
                f"over {', '.join(f'{protocol} {address}' for protocol, address in self.addresses)}; restart the "
                "run (systemctl restart edge-inspect@LINE under systemd)")

    def _message(self, kind: str, payload) -> bytes:
        """The framed message, within PIPE_BUF: a long alarm text is cut (by its encoded bytes)."""
        data = json.dumps([kind, payload], ensure_ascii=False).encode()
        while HEADER.size + len(data) > MESSAGE_MAX and kind == "alarm" and payload.get("message"):
            payload = {**payload, "message": payload["message"][:len(payload["message"]) * 3 // 4]}
            data = json.dumps([kind, payload], ensure_ascii=False).encode()
        return HEADER.pack(len(data)) + data

    def _write(self, message: bytes) -> bool:
        """Whole or not at all; False when the pipe is full."""
        try:
            os.write(self.updates.fileno(), message)
            return True
        except BlockingIOError:
            return False

    def _send(self, kind: str, payload) -> None:
        with self.lock:
            if self.closed:
                return
            message = self._message(kind, payload)
            try:
                if len(message) > MESSAGE_MAX:
                    raise ValueError(f"{len(message)} bytes, more than a pipe takes whole")
                while self.kept and self._write(self.kept[0]):
                    self.kept.popleft()
                if not self.kept and self._write(message):
                    return
                if kind != "frame":
                    self.kept.append(message)
                    return
                self.dropped += 1
                self.warn("plc-behind", f"the PLC servers fall behind: {self.dropped} updates dropped so far")
            except (OSError, ValueError) as error:
                self.dropped += 1
                self.warn("plc-gone", f"an update for the PLC servers was dropped ({error}; their process "
                                      f"{'runs' if self.process.is_alive() else 'has ended'})")

    def handle(self, item: Inspected) -> None:
        self._send("frame", frame_result(item))

    def alarm(self, event: dict) -> None:
        """Health's listener: an alarm raised or cleared."""
        self._send("alarm", {key: event.get(key) for key in ("id", "kind", "source", "state", "message")})

    def use_bundle(self, bundle) -> None:
        """A new version judges from now on."""
        self._send("bundle", bundle_identity(bundle))

    def close(self) -> None:
        """Close the pipe: the servers take what it holds, say "Halted" and stop (killed if they do not: they
        ignore SIGTERM, which systemd sends the whole unit)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.kept:
                os.set_blocking(self.updates.fileno(), True)  # the last alarms and versions, before the end
                for message in self.kept:
                    try:
                        os.write(self.updates.fileno(), message)
                    except OSError:
                        break
            self.updates.close()
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
