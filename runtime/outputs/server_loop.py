"""The servers the line's PLC reads (Modbus TCP, OPC UA) run on an asyncio loop in a thread of their own: the
frame loop only posts the new values to that loop and never waits on it, so a client that stalls, floods or drops
off never delays inspection."""

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable

from edgeinspect.runtime.console import InspectError, RateLimitedWarning


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


class ServerLoop:
    """Runs `start()` on a new loop (the constructor waits for it and raises its failure as one line), keeps the
    loop turning for posted work until close(), then runs `stop()`."""

    def __init__(self, where: str, start: Callable[[], Awaitable], stop: Callable[[], Awaitable],
                 start_timeout_s: float = 30.0):
        self.where = where  # the option and address, for messages: "--modbus 0.0.0.0:5020"
        self.loop = asyncio.new_event_loop()
        self.closing = False
        self.warn = RateLimitedWarning()
        self._stop = stop
        started: dict = {}
        ready = threading.Event()

        async def main():
            self._stop_requested = asyncio.Event()
            try:
                await start()
            except Exception as error:  # noqa: BLE001 - said by the constructor, in the caller's thread
                started["error"] = error
                return
            finally:
                ready.set()
            await self._stop_requested.wait()
            try:
                await self._stop()
            finally:
                tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), name=where, daemon=True)
        self.thread.start()
        if not ready.wait(start_timeout_s) or "error" in started:
            self.thread.join(timeout=1)
            raise InspectError(f"{where}: the server did not start ({started.get('error') or 'no answer'})")

    def post(self, coroutine) -> None:
        """Hand work to the server's loop without waiting for it."""
        if not self.thread.is_alive():  # nothing would run it: said, and not queued up without end
            coroutine.close()
            if not self.closing:
                self.warn(self.where, f"{self.where}: the server has stopped; the PLC gets no verdicts")
            return
        try:
            asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop has closed (the run is ending)
            coroutine.close()

    def call(self, coroutine, timeout_s: float = 5.0):
        """Run work on the server's loop and wait for its result (for what must be done before going on)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        if self.closing:
            return
        self.closing = True
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_requested.set)
            self.thread.join(timeout=timeout_s)
        if not self.thread.is_alive():
            self.loop.close()
