"""Verdicts for the line's PLC over Modbus TCP (`inspect-run … --modbus HOST:PORT`), the signal every PLC can
read, with no broker in between. inspect-run is the server (device id 1); the register map (README, "The PLC")
is per source, in the order of --source:

- coil 2·i: NG. Set on each NG frame; `latched` (default): stays set until the PLC writes 0 to acknowledge;
  `pulse`: cleared again after --modbus-pulse-ms.
- coil 2·i + 1: OK, the last frame's verdict was OK.
- holding register 0: heartbeat, +1 every second (wraps at 65536); 1: the number of sources.
- holding registers 10 + 10·i onwards: frames inspected, NG frames (both wrap at 65536), the last verdict
  (0 none yet, 1 OK, 2 NG, 3 skipped), the last score × 100 and the image threshold × 100 (0 to 65535), the
  bundle version, the last `seq` (low 16 bits).

The server runs in the PLC servers' process (plc_process), on its asyncio loop: a client that stalls, floods or
drops off never delays inspection."""

import asyncio
import logging
import math
import time

from edgeinspect.runtime.console import InspectError

DEVICE_ID = 1
HEARTBEAT, SOURCES = 0, 1
BLOCK, BLOCK_SIZE = 10, 10
FRAMES, NG_FRAMES, VERDICT, SCORE, THRESHOLD, VERSION, SEQ = range(7)
VERDICT_CODES = {None: 0, "OK": 1, "NG": 2, "skipped": 3}
NG_MODES = ("latched", "pulse")
COILS, HOLDING = 5, 6  # function codes of the writes that update them (write single coil / register)


def parse_modbus_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise InspectError(f"--modbus {text!r}: give HOST:PORT, e.g. 0.0.0.0:5020 (port 1 to 65535)")
    return host, int(port)


def check_modbus_options(address: str, ng_mode: str, pulse_ms: int) -> None:
    parse_modbus_address(address)
    if ng_mode not in NG_MODES:
        raise InspectError(f"--modbus-ng {ng_mode!r} is not one of {', '.join(NG_MODES)}")
    if not (isinstance(pulse_ms, int) and 10 <= pulse_ms <= 60_000):
        raise InspectError(f"--modbus-pulse-ms must be from 10 to 60000, got {pulse_ms}")


def register_value(value: float | None, scale: float = 100.0) -> int:
    """A number as an unsigned 16-bit register, scaled and clipped; not finite or missing → 0."""
    if value is None or not math.isfinite(value):
        return 0
    return int(min(max(round(value * scale), 0), 65535))


class ModbusServer:
    """One frame's result at a time (plc_process's), on the loop it was started on."""

    def __init__(self, address: str, sources: list[str], ng_mode: str = "latched", pulse_ms: int = 500):
        """The options as inspect-run checked them (check_modbus_options, and the address free)."""
        self.host, self.port = parse_modbus_address(address)
        self.index = {label: i for i, label in enumerate(sources)}
        self.ng_mode, self.pulse_s = ng_mode, pulse_ms / 1000
        self.counts = {label: [0, 0] for label in sources}  # frames, NG
        self.clients = 0  # PLCs connected, for the operator's page
        self.pulses: dict[int, int] = {}  # NG pulses started per coil

    async def start(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator.simdata import DataType, SimData
        from pymodbus.simulator.simdevice import SimDevice

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # its own lines would interleave the console's
        registers = BLOCK + BLOCK_SIZE * len(self.index)
        device = SimDevice(id=DEVICE_ID, simdata=(
            [SimData(0, count=2 * len(self.index), values=False, datatype=DataType.BITS)],
            [SimData(0, count=1, values=False, datatype=DataType.BITS)],
            [SimData(0, count=registers, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)]))
        self.server = ModbusTcpServer(device, address=(self.host, self.port), trace_connect=self._connected)
        await self.server.serve_forever(background=True)
        await self._set(HOLDING, SOURCES, [len(self.index)])
        self.heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())

    def _connected(self, connected: bool) -> None:
        self.clients += 1 if connected else -1

    async def _set(self, kind: int, address: int, values: list) -> None:
        await self.server.async_setValues(DEVICE_ID, kind, address, values)

    async def _heartbeat(self) -> None:
        beat, next_beat = 0, time.monotonic() + 1.0
        while True:  # until stopped
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            next_beat += 1.0
            beat = (beat + 1) % 65536
            await self._set(HOLDING, HEARTBEAT, [beat])

    async def _pulse_off(self, coil: int, pulse: int) -> None:
        await asyncio.sleep(self.pulse_s)
        if self.pulses[coil] == pulse:  # no NG came since: a later one gets its whole pulse
            await self._set(COILS, coil, [False])

    async def publish(self, result: dict) -> None:
        """One frame: its registers, the OK coil, the NG coil (and the end of its pulse)."""
        label = result["source"]
        if label not in self.index:
            return
        i, verdict = self.index[label], result["verdict"]
        counts = self.counts[label]
        counts[0] = (counts[0] + (verdict != "skipped")) % 65536
        counts[1] = (counts[1] + (verdict == "NG")) % 65536
        await self._set(HOLDING, BLOCK + BLOCK_SIZE * i, [
            counts[0], counts[1], VERDICT_CODES.get(verdict, 0), register_value(result["score"]),
            register_value(result["threshold"]), result["version"] % 65536, result["seq"] % 65536])
        if verdict in ("OK", "NG"):
            await self._set(COILS, 2 * i + 1, [verdict == "OK"])
        if verdict == "NG":
            await self._set(COILS, 2 * i, [True])
            if self.ng_mode == "pulse":
                pulse = self.pulses[2 * i] = self.pulses.get(2 * i, 0) + 1
                asyncio.get_running_loop().create_task(self._pulse_off(2 * i, pulse))

    async def stop(self) -> None:
        self.heartbeat.cancel()
        await self.server.shutdown()
