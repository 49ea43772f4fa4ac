"""Whether the state being trained may be saved: divergence is caught before it is checkpointed.

Three signs, each with its reason (the settings are `train.divergence_*`, docs/reliability.md):
- a loss spike: the median flow loss of the last RECENT steps (the term that is always on; the
  total can be negative with REPA) over `divergence_factor` times its median over the
  `divergence_window` healthy steps before them (checked once WARMUP of those are known). A median
  of a few steps, not one step: one batch's loss is heavy-tailed (the default's step 97: 26 times
  the median of the 50 before; the median of 5 never went past 1.3 times in its first 100 steps),
  divergence lasts. Losses seen while unhealthy are not history, so a diverged plateau stays one.
  Not the gradient norm: it is clipped (train.grad_clip), so a spike of it moves the weights no
  further than a healthy step, and healthy runs have them (the default's step 14: 48 against a
  median of 2.2); what a clipped gradient does step after step shows in the weights;
- a skipped step: a non-finite loss or gradient norm (the update was not applied) leaves the state
  unhealthy, however short the streak;
- weights growing past a bound: at a checkpoint, the global weight norm over
  `divergence_weight_growth` times its value at the last healthy checkpoint (or at the session's
  start). A bound relative to the run's own weights, not an absolute one: a model's norm depends on
  its size and init (the default's: 104 at init, 106 at step 100; a lr of 1e6 takes the tiny test
  model's from 29 to 1.5e8 in one step).

An unhealthy state turns healthy again after RECOVER steps in a row with no sign of the first two
kinds (and weights within their bound at the next checkpoint). A checkpoint due while unhealthy is
not written. `Health` is pure bookkeeping, so its rule is tested by hand on a synthetic history.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

WARMUP = 10  # healthy steps in the history before a spike is looked for
RECENT = 5  # the steps whose median loss is compared with the history
RECOVER = 10  # healthy steps in a row after which an unhealthy state is healthy again


@dataclass
class Health:
    """The detector of one session (its history starts afresh at a resume)."""

    factor: float = 10.0  # a spike: over this many times the history's median; 0 = no spike check
    window: int = 50  # the history's length, in healthy steps
    weight_growth: float = 10.0  # the weight norm's bound, as a multiple of its healthy reference; 0 = none
    losses: deque = field(default_factory=deque)  # the history: healthy losses before the recent ones
    recent: deque = field(default_factory=deque)  # the last RECENT finite losses
    reason: str | None = None  # why the state is unhealthy (None: healthy)
    since: int = 0  # the step it turned unhealthy
    calm: int = 0  # healthy steps in a row since it turned unhealthy
    reference_norm: float | None = None  # the weight norm at the last healthy checkpoint (or start)

    @property
    def healthy(self) -> bool:
        return self.reason is None

    def observe(self, step: int, loss: float, grad_norm: float, applied: bool) -> str | None:
        """Account for one step. Returns the reason when this step turns the state unhealthy."""
        if applied and math.isfinite(loss):
            self._remember(loss)
        sign = self.sign(loss, grad_norm, applied)
        if sign is None:
            if self.reason is not None:
                self.calm += 1
                if self.calm >= RECOVER:
                    self.reason = None
            return None
        self.calm = 0
        if self.reason is not None:
            return None
        self.reason, self.since = sign, step
        return sign

    def sign(self, loss: float, grad_norm: float, applied: bool) -> str | None:
        """The sign of divergence this step shows, in words, or None."""
        if not applied or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"a skipped step (loss {loss:g}, gradient norm {grad_norm:g} not finite)"
        if not self.factor or len(self.losses) < min(WARMUP, self.window) or len(self.recent) < RECENT:
            return None
        now, before = statistics.median(self.recent), statistics.median(self.losses)
        if before > 0 and now > self.factor * before:
            return (
                f"a loss spike (median flow loss {now:.4g} over the last {RECENT} steps, over "
                f"train.divergence_factor={self.factor:g} times its median {before:.4g} over the "
                f"{len(self.losses)} healthy steps before)"
            )
        return None

    def _remember(self, loss: float) -> None:
        """The loss joins the recent ones; the one that leaves them joins the history if healthy."""
        self.recent.append(loss)
        if len(self.recent) > RECENT:
            older = self.recent.popleft()
            if self.reason is None:
                self.losses.append(older)
                while len(self.losses) > max(self.window, 1):
                    self.losses.popleft()

    def check_weights(self, step: int, norm: float) -> str | None:
        """At a checkpoint: the weight norm against its bound. Returns the reason when it is past it
        (the state is then unhealthy until a later checkpoint finds it within)."""
        if self.reference_norm is None or not self.weight_growth:
            return None
        if math.isfinite(norm) and norm <= self.weight_growth * self.reference_norm:
            if self.reason is not None and self.reason.startswith("weights"):
                self.reason = None
            return None
        why = (
            f"weights grown past their bound (global norm {norm:.4g}, over train.divergence_weight_growth="
            f"{self.weight_growth:g} times {self.reference_norm:.4g} at the last healthy checkpoint)"
        )
        if self.reason is None:
            self.reason, self.since, self.calm = why, step, 0
        return why
