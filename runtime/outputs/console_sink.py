"""Each frame's verdict as a console line."""

from edgeinspect.runtime.console import console
from edgeinspect.runtime.outputs.sinks import Inspected, Sink
from rich.markup import escape


class ConsoleSink(Sink):
    """verbose: True prints every frame, None only NG frames (cameras), False nothing."""

    def __init__(self, verbose: bool | None):
        self.verbose = verbose

    def handle(self, item: Inspected) -> None:
        record = item.record
        if item.skipped:
            if self.verbose is not False:
                console.print(escape(f"{record['name']}: skipped ({record['skipped']})"))
        elif self.verbose is True or (self.verbose is None and item.verdict == "NG"):
            console.print(escape(f"{record['name']}: {item.verdict or '-'} score {record['score']:.3f}"
                                 + (f" → {record['overlay']}" if "overlay" in record else "")))
