"""Where each inspection goes. The frame loop makes one record per frame and hands it to a list of small
sinks (JSON log, overlay store, live view, MQTT, console), each with the same two methods, each testable
alone; a sink that fails is reported (at most once a minute) and the others go on. The overlay is drawn at
most once per frame, by the first sink that asks for it."""

from dataclasses import dataclass, field

import numpy as np
from edgeinspect.runtime.console import RateLimitedWarning, warn
from edgeinspect.runtime.inference.regions import heat_overlay


@dataclass
class Inspected:
    """One frame's outcome as the sinks see it. `record` is the JSON line (sinks earlier in the list may add
    to it, as the overlay store adds the overlay's path); `skipped` frames have no image, only a reason in
    the record."""

    record: dict
    rgb: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    pixel_threshold: float | None = None
    _overlay: np.ndarray | None = field(default=None, repr=False)

    @property
    def skipped(self) -> bool:
        return "skipped" in self.record

    @property
    def verdict(self) -> str | None:
        return self.record.get("verdict")

    def overlay(self) -> np.ndarray:
        """BGR heat-map overlay with the regions outlined, drawn on first use."""
        if self._overlay is None:
            self._overlay = heat_overlay(self.rgb, self.anomaly_map, self.pixel_threshold)
        return self._overlay


class Sink:
    """The contract: handle one inspected frame; close at the end of the run (flush, say goodbye)."""

    def handle(self, item: Inspected) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Sinks:
    """Hands each inspected frame to every sink in order; one sink's failure never stops the others."""

    def __init__(self, sinks: list[Sink], warn_limited: RateLimitedWarning | None = None):
        self.sinks = sinks
        self.warn = warn_limited or RateLimitedWarning()
        self.failures: dict[str, int] = {}

    def handle(self, item: Inspected) -> None:
        for sink in self.sinks:
            try:
                sink.handle(item)
            except Exception as error:  # noqa: BLE001 - the run goes on; the failure is counted and said
                name = type(sink).__name__
                self.failures[name] = self.failures.get(name, 0) + 1
                self.warn(name, f"{name} failed: {type(error).__name__}: {error}; the run goes on")

    def close(self) -> None:
        """Close every sink once; a second call does nothing."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001
                warn(f"{type(sink).__name__} could not close cleanly: {type(error).__name__}: {error}")
