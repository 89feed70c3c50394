"""Micro-batches prepared ahead of the training loop, in a background thread.

Encoding a micro-batch (opening and resizing the images of JSONL samples, patchifying, packing) is CPU work
that would otherwise stall the GPU between steps. ``Prefetcher`` runs the ``Curriculum`` in a daemon thread up
to ``depth`` micro-batches ahead (optionally pinning their tensors for asynchronous host-to-device copies) and
hands them out in order with the curriculum's learning rate, position and state *after* each one: a checkpoint
saves the state of the last micro-batch the loop consumed, not of the thread's, so resuming continues exactly
where training stopped. The curriculum draws from name-seeded generators, so the stream is the same with and
without the thread. An exception in the thread (a missing image file, say) is raised by ``next``.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from mgpt_train.data.curriculum import Curriculum, CurriculumStage


@dataclass
class Prepared:
    """One micro-batch as the curriculum produced it, with what the curriculum said right after."""
    stage: CurriculumStage
    batch: dict
    lr: float
    position: dict
    state: dict  # Curriculum.state_dict() after this micro-batch: resuming from it yields the next one


_END = object()


class Prefetcher:
    """Iterates ``Prepared`` micro-batches of ``curriculum``; ``depth`` > 0 prepares them in a background
    thread (at most ``depth`` waiting), 0 inline. ``pin_device``: a CUDA device to pin the batch tensors for; the
    thread makes it its current device first (as DataLoader's pin thread does), else pinning would create a
    context on GPU 0 from every rank of a node."""

    def __init__(self, curriculum: Curriculum, depth: int = 2, pin_device: torch.device | None = None):
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"Prefetcher: depth must be an int >= 0, got {depth!r}")
        if pin_device is not None and torch.device(pin_device).type != "cuda":
            raise ValueError(f"Prefetcher: pin_device must be a CUDA device or None, got {pin_device}")
        self.curriculum, self.pin_device = curriculum, pin_device
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._produce, name="mgpt-prefetch", daemon=True)
            self._thread.start()

    def _prepare(self) -> Prepared:
        stage, batch = next(self.curriculum)
        if self.pin_device is not None:
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return Prepared(stage, batch, self.curriculum.lr, dict(self.curriculum.position),
                        self.curriculum.state_dict())

    def _produce(self) -> None:
        if self.pin_device is not None:
            torch.cuda.set_device(self.pin_device)
        while not self._stop.is_set():
            try:
                item = self._prepare()
            except StopIteration:
                item = _END
            except BaseException as exc:  # handed to the training loop, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _END or isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self) -> Prepared:
        if self._thread is None:
            return self._prepare()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls see the end too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (micro-batches prepared ahead are dropped; the curriculum object is then ahead of
        what was consumed: restore it from the last ``Prepared.state`` to go on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
