"""Batches placed on the devices ahead of the step that needs them."""

from __future__ import annotations

import queue
import threading


def prefetch(iterator, place, size: int = 2):
    """Yield the (position, batch) items of `iterator` with `place(batch)` applied (putting the batch
    on the devices), computing the next `size` in a background thread, so that host work and
    transfers overlap the running step.

    Close the generator (`.close()`, or let it be collected) when the run ends early: the producer
    thread then stops at its next batch instead of waiting forever on a full queue, holding the
    batches it placed on the devices."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    closed = threading.Event()

    def put(item) -> bool:
        """Hand `item` over unless the consumer has gone; True if it was handed over."""
        while not closed.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer():
        try:
            for position, batch in iterator:
                if closed.is_set() or not put((position, place(batch))):
                    return
        except BaseException as err:  # hand the error to the consumer
            put(err)
            return
        put(done)

    thread = threading.Thread(target=producer, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        while not q.empty():  # let go of the batches already placed
            q.get_nowait()
        thread.join(timeout=10)
