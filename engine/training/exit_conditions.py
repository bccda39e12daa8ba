"""When a run should stop early with a checkpoint: a signal, an iteration interval, a time budget.

Every rank must stop at the same iteration, so local observations (a signal that reached
some ranks, a clock that crossed the budget on one) are combined with a MAX all-reduce
once per iteration.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

from engine.arguments import TrainingConfig
from engine.platform import current_device

logger = logging.getLogger(__name__)

REASONS = ("signal", "exit interval", "exit duration")


class ExitConditions:
    def __init__(self, training: TrainingConfig):
        self.training = training
        self.start = time.monotonic()
        self.received_signal: int | None = None
        self._previous_handlers = {}
        if training.exit_signal_handler:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received_signal = signum
        logger.warning("received %s: saving a checkpoint after this iteration, then exiting",
                       signal.Signals(signum).name)

    def check(self, iteration: int) -> str | None:
        """Collective; the reason to stop after `iteration`, or None."""
        train = self.training
        if not (train.exit_signal_handler or train.exit_interval or train.exit_duration_in_mins):
            return None
        local = torch.tensor([
            int(self.received_signal is not None),
            int(train.exit_interval is not None and iteration % train.exit_interval == 0),
            int(train.exit_duration_in_mins is not None
                and time.monotonic() - self.start >= 60 * train.exit_duration_in_mins),
        ], device=current_device())
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return next((reason for reason, hit in zip(REASONS, local.tolist()) if hit), None)

    def close(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
