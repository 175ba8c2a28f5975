"""The scheduler alone (no model, no tensors): admission order, rows freed and reused, prefixes
giving rows back to waiting requests, the fall-back to a prefix's base, aborts."""

from dataclasses import dataclass

import pytest

from qomni.engine.scheduler import Scheduler


@dataclass(eq=False)
class Pre:
    row: int | None = None
    ready: bool = False
    closed: bool = False
    base: "Pre | None" = None
    freed: bool = False

    def free(self) -> None:
        self.freed = True


@dataclass(eq=False)
class Seq:
    name: str
    talks: bool = False
    prefix: Pre | None = None
    row: int | None = None
    talker_row: int | None = None


def ready_prefix(s: Scheduler, base: Pre | None = None) -> Pre:
    """A prefix prefilled the way the engine does it."""
    p = Pre(base=base)
    s.add_prefix(p)
    assert s.next_prefix() is p
    s.place_prefix(p, keep_base=False)
    p.ready = True
    return p


def test_admission_is_in_arrival_order_and_rows_are_reused():
    s = Scheduler(rows=2, talker_rows=2)
    a, b, c = Seq("a"), Seq("b"), Seq("c")
    for x in (a, b, c):
        s.add(x)
    assert s.admit() == [a, b] and (a.row, b.row) == (0, 1)
    assert list(s.waiting) == [c] and s.admit() == []
    s.release(a)
    assert a.row is None and s.admit() == [c] and c.row == 0
    assert s.running == [b, c] and not s.waiting


def test_a_speaking_request_waits_for_a_talker_row_and_keeps_the_queue_in_order():
    s = Scheduler(rows=3, talker_rows=1)
    a, b, c = Seq("a", talks=True), Seq("b", talks=True), Seq("c")
    for x in (a, b, c):
        s.add(x)
    assert s.admit() == [a] and a.talker_row == 0
    assert list(s.waiting) == [b, c]  # c waits behind b, though it needs no talker row
    s.free_row(a)  # its text is done, its speech is not: the thinker row comes back first
    assert a.row is None and s.free_rows == [1, 2, 0] and s.admit() == []
    s.release(a)
    assert s.admit() == [b, c] and b.talker_row == 0 and (b.row, c.row) == (1, 2)


def test_abort_of_waiting_and_running_requests_frees_their_rows():
    s = Scheduler(rows=1, talker_rows=1)
    a, b = Seq("a", talks=True), Seq("b")
    s.add(a)
    s.add(b)
    s.admit()
    s.release(b)  # abort while waiting
    assert not s.waiting
    s.release(a)  # abort while running
    assert s.free_rows == [0] and s.free_talker_rows == [0] and not s.running
    assert not s.has_work()


def test_prefixes_wait_while_requests_do_and_give_their_rows_back():
    s = Scheduler(rows=2)
    p1, p2 = ready_prefix(s), ready_prefix(s)
    assert (p1.row, p2.row) == (0, 1) and not s.free_rows
    a = Seq("a")
    s.add(a)
    assert s.next_prefix() is None  # a request waits: no prefix is prefilled
    assert s.admit() == [a] and a.row == 0  # the first idle prefix gave its row back
    assert p1.closed and p1.freed and p1.row is None and s.prefixes == [p2]
    p3 = Pre()
    s.add_prefix(p3)
    assert not s.can_prefill(p3) and s.next_prefix() is None  # no row free: it waits
    s.release(a)
    assert s.next_prefix() is p3


def test_a_request_continues_its_prefix_row_and_keeps_one_a_waiting_request_needs():
    s = Scheduler(rows=2)
    mine, other = ready_prefix(s), ready_prefix(s)
    a, b = Seq("a", prefix=mine), Seq("b")
    s.add(a)
    s.add(b)
    assert s.admit() == [a, b]
    assert a.row == mine.row == 0 and mine.closed and not mine.freed  # taken over, not freed
    assert b.row == 1 and other.closed and other.freed  # evicted for b
    assert not s.prefixes


def test_a_prefix_kept_for_a_waiting_request_is_not_evicted():
    s = Scheduler(rows=1)
    p = ready_prefix(s)
    s.add(Seq("a", prefix=p))
    blocked = Seq("b")
    s.add(blocked)
    (a,) = s.admit()
    assert a.row == 0 and list(s.waiting) == [blocked]


def test_a_request_whose_newest_prefix_is_not_ready_falls_back_to_its_base():
    s = Scheduler(rows=2)
    base = ready_prefix(s)
    newer = Pre(base=base)
    s.add_prefix(newer)
    a = Seq("a", prefix=newer)
    s.add(a)
    assert s.admit() == [a]
    assert a.prefix is base and a.row == base.row and newer.closed and newer.freed
    assert s.free_rows == [1]


def test_a_prefix_continues_its_base_row_or_frees_it():
    s = Scheduler(rows=2)
    base = ready_prefix(s)
    p = Pre(base=base)
    s.add_prefix(p)
    assert s.continuable_base(p) is base
    s.place_prefix(p, keep_base=True)
    assert p.row == 0 and base.closed and base.row is None and s.free_rows == [1]
    q = Pre(base=p)
    p.ready = True
    s.add_prefix(q)
    s.place_prefix(q, keep_base=False)  # nothing shared: a fresh row, the base's freed
    assert q.row == 1 and p.closed and s.free_rows == [0]


def test_a_prefix_whose_base_is_not_ready_starts_alone():
    s = Scheduler(rows=1)
    base = Pre()
    s.add_prefix(base)
    p = Pre(base=base)
    s.add_prefix(p)
    assert p.base is None and base.closed and s.prefixes == [p]


@pytest.mark.parametrize("rows", [1, 3])
def test_every_row_comes_back(rows):
    s = Scheduler(rows=rows, talker_rows=rows)
    seqs = [Seq(str(i), talks=i % 2 == 0) for i in range(7)]
    for x in seqs:
        s.add(x)
    while s.waiting or s.running:
        for x in s.admit():
            assert x.row is not None
        s.release(s.running[0])
    assert sorted(s.free_rows) == sorted(s.free_talker_rows) == list(range(rows))


def test_admission_can_stop_after_some_requests():
    s = Scheduler(rows=3)
    a, b, c = Seq("a"), Seq("b"), Seq("c")
    for x in (a, b, c):
        s.add(x)
    assert s.admit(1) == [a] and s.admit(1) == [b] and list(s.waiting) == [c]


def test_a_prefix_being_prefilled_goes_on_first_and_is_given_up_for_a_request():
    s = Scheduler(rows=2)
    started = Pre()
    s.add_prefix(started)
    s.place_prefix(started, keep_base=False)  # its first piece is in the cache, not all
    fresh = Pre()
    s.add_prefix(fresh)
    assert s.next_prefix() is started and s.next_prefix([started]) is fresh
    s.place_prefix(fresh, keep_base=False)
    assert not s.free_rows and s.can_prefill(started) and s.has_work()
    a = Seq("a", prefix=started)  # of no use to a until it is ready
    s.add(a)
    assert s.next_prefix() is None
    assert s.admit() == [a] and a.row == 0 and started.closed and started.freed
    assert s.prefixes == [fresh]
