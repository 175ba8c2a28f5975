"""Who holds which cache row: the waiting queue, running requests, talker rows and prompt
prefixes. Integers and lists only: the model work is the runner's (`engine/runner.py`), and
`engine/engine.py` calls both.

Rules: requests are admitted in arrival order, each into a free thinker row (or the row of the
prefix it continues) and, when it speaks, a free talker row; a request that cannot be admitted
keeps the ones after it waiting. Requests come before prefixes: a prefix is prefilled only while
no request waits, and a prefilled one gives its row back when a waiting request needs it (a
request never waits on a prefix; one still being prefilled in pieces is of no use to it). A
request whose newest prefix is not prefilled yet continues the one that prefix replaces, when
that one is. Rows are reused; nothing is allocated here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol


class PrefixSlot(Protocol):
    """What the scheduler reads and sets on a prefix (`engine.request.Prefix`)."""

    row: int | None  # set once its prefill starts
    ready: bool  # prefilled into `row`, all of it
    closed: bool  # used, released or evicted: it holds nothing
    base: PrefixSlot | None  # the earlier prefix it replaces, while that one may be continued

    def free(self) -> None:
        """Drop what it holds besides its row."""


class SeqSlot(Protocol):
    """What the scheduler reads and sets on a request (`engine.request.Request`)."""

    row: int | None
    talker_row: int | None
    prefix: PrefixSlot | None

    @property
    def talks(self) -> bool:
        """Needs a talker row."""


class Scheduler:
    def __init__(self, rows: int, talker_rows: int = 0):
        self.free_rows = list(range(rows))
        self.free_talker_rows = list(range(talker_rows))
        self.waiting: deque[SeqSlot] = deque()
        self.running: list[SeqSlot] = []
        self.prefixes: list[PrefixSlot] = []  # waiting for a row, or prefilled and holding one

    # -- requests -------------------------------------------------------------------------------

    def add(self, seq: SeqSlot) -> None:
        self.waiting.append(seq)

    def admit(self, most: int | None = None) -> list[SeqSlot]:
        """The waiting requests that get rows now (at most `most`), in arrival order, with
        `row` (and `talker_row`) set. A request whose `row` is its prefix's continues that
        prefix."""
        self._evict_idle_prefixes()
        admitted: list[SeqSlot] = []
        while self.waiting and (most is None or len(admitted) < most):
            seq = self.waiting[0]
            self._fall_back_to_base(seq)
            continues = self.holds_row(seq.prefix)
            if not (self.free_rows or continues):
                break
            if seq.talks and not self.free_talker_rows:
                break
            self.waiting.popleft()
            if continues:  # the prefix's row is the request's now
                seq.row = seq.prefix.row
                self.prefixes.remove(seq.prefix)
                seq.prefix.closed = True
            else:
                seq.row = self.free_rows.pop(0)
                if seq.prefix is not None:  # not prefilled yet: no use any more
                    self.release_prefix(seq.prefix)
            if seq.talks:
                seq.talker_row = self.free_talker_rows.pop(0)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def free_row(self, seq: SeqSlot) -> None:
        """The thinker row back (its text is done; the talker never reads the thinker cache)."""
        if seq.row is not None:
            self.free_rows.append(seq.row)
            seq.row = None

    def release(self, seq: SeqSlot) -> None:
        """Every row back; the request leaves the running (or waiting) set."""
        self.free_row(seq)
        if seq.talker_row is not None:
            self.free_talker_rows.append(seq.talker_row)
            seq.talker_row = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    # -- prefixes -------------------------------------------------------------------------------

    def add_prefix(self, p: PrefixSlot) -> None:
        # A base not prefilled yet has nothing to continue: continue the prefilled one it
        # replaces, if any (the prefixes between are of no use any more).
        while p.base is not None and not p.base.ready:
            stale = p.base
            p.base, stale.base = stale.base, None
            self.release_prefix(stale)
        self.prefixes.append(p)

    def release_prefix(self, p: PrefixSlot) -> None:
        """Free what a prefix holds (nothing once a request took it over), and the earlier
        prefix it was to replace: that one is closed either way."""
        base, p.base = p.base, None
        if base is not None:
            self.release_prefix(base)
        if p in self.prefixes:
            self.prefixes.remove(p)
        if p.row is not None and not p.closed:
            self.free_rows.append(p.row)
        p.row, p.closed, p.ready = None, True, False
        p.free()

    def next_prefix(self, skip: Sequence[PrefixSlot] = ()) -> PrefixSlot | None:
        """A prefix to prefill now, other than those in `skip`: none while requests wait. One
        being prefilled in pieces (it has a row) comes before those not started."""
        if self.waiting:
            return None
        todo = [p for p in self.prefixes if self.can_prefill(p) and p not in skip]
        return min(todo, key=lambda p: p.row is None, default=None)

    def can_prefill(self, p: PrefixSlot) -> bool:
        """A prefix being prefilled goes on; one not started waits for a free row, unless it
        may continue its base's."""
        if p.ready:
            return False
        return p.row is not None or bool(self.free_rows or self.holds_row(p.base))

    def continuable_base(self, p: PrefixSlot) -> PrefixSlot | None:
        """The prefilled prefix `p` may continue (its base), if any."""
        return p.base if self.holds_row(p.base) else None

    def place_prefix(self, p: PrefixSlot, keep_base: bool) -> None:
        """Give `p` a row before it is prefilled: its base's when it keeps some of the base's
        tokens (`keep_base`), else a free one. The base is released either way."""
        base, p.base = p.base, None
        if keep_base and self.holds_row(base):
            p.row, base.row = base.row, None
        if base is not None:
            self.release_prefix(base)  # frees its row unless taken over just above
        if p.row is None:
            p.row = self.free_rows.pop(0)

    def holds_row(self, p: PrefixSlot | None) -> bool:
        return p is not None and p.ready and p.row is not None and not p.closed

    # -- state ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or any(self.can_prefill(p)
                                                        for p in self.prefixes))

    def _evict_idle_prefixes(self) -> None:
        while self.waiting and not self.free_rows:
            # A prefix still being prefilled is of no use to a request yet.
            idle = [p for p in self.prefixes if p.row is not None
                    and (not p.ready or all(s.prefix is not p for s in self.waiting))]
            if not idle:
                return
            self.release_prefix(idle[0])

    def _fall_back_to_base(self, seq: SeqSlot) -> None:
        p = seq.prefix
        if p is not None and not p.ready and p.base is not None and p.base.ready:
            # Its newest prefix is not prefilled yet; the one that it replaces is.
            seq.prefix, p.base = p.base, None
            self.release_prefix(p)
