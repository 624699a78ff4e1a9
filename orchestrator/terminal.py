"""EventDisplay: what ``cuepipe run`` shows in the terminal — a progress bar, or JSON lines.

Progress bars go to stderr (tqdm hides them when stderr is not a terminal); ``--json`` prints one
JSON object per Job Event on stdout for programs (TD's launcher, scripts) to read. A ``job/warning``
is shown when it arrives and again below the job's final line, so it is the last thing seen.
"""

from __future__ import annotations

import json
import sys
from typing import IO

from tqdm import tqdm

from cuepipe.stages.codec import Message


class EventDisplay:
    def __init__(self, json_lines: bool, stream: IO[str] | None = None) -> None:
        self.json_lines = json_lines
        self.stream = stream or (sys.stdout if json_lines else sys.stderr)
        self._bar: tqdm | None = None
        self.warnings: list[str] = []  # every job/warning, as shown

    def show(self, event: Message) -> None:
        if self.json_lines:
            print(json.dumps(event.to_json()), file=self.stream, flush=True)
            return
        name = event.spec.name
        f = event.fields
        if name == "job/stage_started":
            self._close_bar()
            self._bar = tqdm(total=1000, desc=f"{f['index']} {f['stage']}", unit="‰", file=self.stream,
                             bar_format="{desc:<16} {percentage:3.0f}%|{bar}| {postfix}", disable=None)
        elif name == "job/progress" and self._bar is not None and f["total"] >= 0:
            self._bar.n = int(f["fraction"] * 1000)
            self._bar.set_postfix_str(f"{f['frame']}/{f['total']} frames, {f['fps']:.1f} fps", refresh=True)
        elif name == "job/live" and self._bar is not None:  # a live stage: no end, so no percentage
            self._bar.set_postfix_str(f"live: {f['frames']} frames, {f['fps']:.1f} fps, {f['dropped']} dropped, "
                                      f"latency p50 {f['latency_p50']:.0f} ms, p95 {f['latency_p95']:.0f} ms",
                                      refresh=True)
        elif name == "job/stage_failed":
            self._close_bar()
            retry = " (retrying)" if f["retrying"] else ""
            self._write(f"stage {f['index']} {f['stage']} failed{retry}: {f['kind']}: {f['message']}")
            if f["stderr"]:
                self._write("  " + f["stderr"].replace("\n", "\n  "))
        elif name == "job/stage_done":
            if self._bar is not None:
                self._bar.n = 1000
                self._bar.refresh()
            self._close_bar()
        elif name == "job/warning":
            self.warnings.append(f"warning: stage {f['index']} {f['stage']}: {f['kind']}: {f['message']}")
            if self._bar is not None:
                self._bar.write(self.warnings[-1], file=self.stream)
            else:
                self._write(self.warnings[-1])
        elif name == "job/failed":
            self._close_bar()
            self._write(f"job {f['job']} failed: {f['kind']}: {f['message']}")
            self._repeat_warnings()
        elif name == "job/cancelled":
            self._close_bar()
            self._write(f"job {f['job']} cancelled during stage {f['index']} {f['stage']}")
            self._repeat_warnings()
        elif name == "job/done":
            count = len(self.warnings)
            self._write(f"job {f['job']} done in {f['seconds']:.1f}s"
                        + (f" with {count} warning{'s' if count > 1 else ''}:" if count else ""))
            self._repeat_warnings()

    def _repeat_warnings(self) -> None:
        for text in self.warnings:
            self._write("  " + text)

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EventDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_bar()


class BatchDisplay:
    """What ``cuepipe batch`` shows: one overall bar (inputs settled) and one bar per running Job, or JSON
    lines (every Job Event, then ``{"item": ...}`` as each input is settled)."""

    def __init__(self, total: int, json_lines: bool, stream: IO[str] | None = None) -> None:
        self.json_lines = json_lines
        self.stream = stream or (sys.stdout if json_lines else sys.stderr)
        self._overall = None if json_lines else tqdm(total=total, desc="batch", unit="clip", file=self.stream,
                                                    position=0, disable=None)
        self._bars: dict[str, tqdm] = {}

    def show(self, event: Message) -> None:
        if self.json_lines:
            print(json.dumps(event.to_json()), file=self.stream, flush=True)
            return
        f, name = event.fields, event.spec.name
        if name == "job/started":
            self._bars[f["job"]] = tqdm(total=1000, desc=str(f["input"])[-28:], unit="‰", file=self.stream,
                                        position=len(self._bars) + 1, leave=False, disable=None,
                                        bar_format="{desc:<28} {percentage:3.0f}%|{bar}| {postfix}")
        elif name == "job/progress" and f["job"] in self._bars:
            bar = self._bars[f["job"]]
            bar.n = int(f["overall"] * 1000)
            bar.set_postfix_str(f"{f['stage']} {f['frame']}/{f['total']}", refresh=True)
        elif name in ("job/done", "job/failed", "job/cancelled") and f["job"] in self._bars:
            self._bars.pop(f["job"]).close()

    def settled(self, item: dict[str, object]) -> None:
        if self.json_lines:
            print(json.dumps({"item": item}, ensure_ascii=False), file=self.stream, flush=True)
        elif self._overall is not None:
            self._overall.update(1)
            if item["status"] == "failed":
                self._overall.write(f"failed: {item['relative']}: {item['kind']}: {item['error']}", file=self.stream)

    def __enter__(self) -> BatchDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self._bars.values():
            bar.close()
        if self._overall is not None:
            self._overall.close()
