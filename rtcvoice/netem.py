"""A user-space netem: drop, delay and reorder the UDP packets an iptables NFQUEUE rule hands it.

This kernel has no ``netem`` qdisc, so ``rtcvoice bench --network`` impairs its calls here
instead: every UDP packet of a private network namespace (``unshare --net``, so nothing else on
the machine is touched) passes through ``iptables -j NFQUEUE``; this process drops each with
probability ``--loss`` and lets the rest go after ``--delay-ms`` plus a normally distributed
``--jitter-ms``. Packets whose delays cross leave in the new order, as netem's jitter reorders
them. Both directions of a call cross the OUTPUT chain once, so each is impaired.

Run as ``python -m rtcvoice.netem``; it needs root and the ``NetfilterQueue`` package (in the
``test`` extra; it builds against Debian's ``libnetfilter-queue-dev``). On SIGTERM it prints
what it did as one JSON line and exits.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Impairment:
    loss: float = 0.0  # the fraction of packets dropped
    delay_ms: float = 0.0  # added to every packet kept
    jitter_ms: float = 0.0  # standard deviation of a normal spread around delay_ms
    seed: int = 1

    @property
    def clean(self) -> bool:
        return self.loss <= 0 and self.delay_ms <= 0 and self.jitter_ms <= 0

    def label(self) -> str:
        if self.clean:
            return "clean"
        return f"{self.loss:.0%} loss, {self.delay_ms:g}±{self.jitter_ms:g} ms"


@dataclass
class Tally:
    packets: int = 0
    dropped: int = 0
    reordered: int = 0  # left before a packet that came in ahead of it
    mean_delay_ms: float = 0.0


class Delayer:
    """The verdicts: which packets to drop, and when to let each of the others go.

    Kept apart from the queue so its arithmetic is testable without root."""

    def __init__(self, impairment: Impairment) -> None:
        self.impairment = impairment
        self.rng = random.Random(impairment.seed)
        self.tally = Tally()
        self._order = itertools.count()
        self._held: list[tuple[float, int, Any]] = []
        self._released_order = -1
        self._delay_sum = 0.0

    def admit(self, packet: Any, now: float) -> bool:
        """False: drop it now. True: held until :meth:`due` gives it back."""
        self.tally.packets += 1
        imp = self.impairment
        if imp.loss > 0 and self.rng.random() < imp.loss:
            self.tally.dropped += 1
            return False
        delay = max(0.0, self.rng.gauss(imp.delay_ms, imp.jitter_ms) if imp.jitter_ms > 0 else imp.delay_ms)
        self._delay_sum += delay
        heapq.heappush(self._held, (now + delay / 1000.0, next(self._order), packet))
        return True

    def due(self, now: float) -> list[Any]:
        out = []
        while self._held and self._held[0][0] <= now:
            _at, order, packet = heapq.heappop(self._held)
            if order < self._released_order:
                self.tally.reordered += 1
            self._released_order = max(self._released_order, order)
            out.append(packet)
        return out

    def next_due(self) -> float | None:
        return self._held[0][0] if self._held else None

    def summary(self) -> dict[str, Any]:
        kept = self.tally.packets - self.tally.dropped
        self.tally.mean_delay_ms = round(self._delay_sum / kept, 1) if kept else 0.0
        return {"impairment": asdict(self.impairment), **asdict(self.tally)}


def serve(queue_num: int, impairment: Impairment) -> dict[str, Any]:
    """Bind the queue and give verdicts until SIGTERM; returns the tally."""
    from netfilterqueue import NetfilterQueue

    delayer = Delayer(impairment)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    def on_packet(packet: Any) -> None:
        if delayer.admit(packet, time.monotonic()):
            packet.retain()  # its verdict comes after this callback returns
        else:
            packet.drop()

    nfq = NetfilterQueue()
    nfq.bind(queue_num, on_packet, max_len=4096)
    fd = nfq.get_fd()
    print("netem: ready", file=sys.stderr, flush=True)
    try:
        while not stopping:
            for packet in delayer.due(time.monotonic()):
                packet.accept()
            nxt = delayer.next_due()
            wait = 0.05 if nxt is None else min(0.05, max(0.0, nxt - time.monotonic()))
            try:
                readable, _, _ = select.select([fd], [], [], wait)
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)
    finally:
        for packet in delayer.due(float("inf")):
            packet.accept()
        nfq.unbind()
    return delayer.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtcvoice.netem", description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=7, help="the NFQUEUE number the iptables rule sends to")
    p.add_argument("--loss", type=float, default=0.0, help="percent of packets dropped")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="standard deviation around --delay-ms")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    try:
        summary = serve(a.queue, Impairment(a.loss / 100.0, a.delay_ms, a.jitter_ms, a.seed))
    except ImportError:
        print(
            "netem: the NetfilterQueue package is missing: pip install NetfilterQueue "
            "(it builds against libnetfilter-queue-dev)",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
