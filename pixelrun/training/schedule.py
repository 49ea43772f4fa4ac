"""The learning-rate schedule: warm-up, constant, then a linear cooldown (warmup-stable-decay), as a
pure function of the step and the config."""

from __future__ import annotations

import torch

from pixelrun.config import Config


def lr_multiplier(step: int, steps: int, warmup: int, cooldown: float) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of optimizer.lr: a linear warm-up
    over `warmup` steps, constant, then (warmup-stable-decay) a linear decay over the last
    round(cooldown * steps) steps, reaching 1/cooldown_steps at the last step (never 0: every step
    of the budget still moves the weights)."""
    m = min(1.0, (step + 1) / max(1, warmup))
    decay = round(cooldown * steps)
    if decay and step >= steps - decay:
        m = min(m, (steps - step) / decay)
    return m


class LRSchedule:
    """The learning rate as a pure function of the step and the config (JiT's `util/lr_sched.py`
    does the same per epoch), so a resume applies the config it runs with: a changed optimizer.lr,
    warm-up or cooldown takes effect, and only the step count comes back from a checkpoint. The
    other optimizer settings of the config (betas, eps, weight decay, Muon's momentum) are re-applied
    after an optimizer state is loaded for the same reason (torch's load_state_dict restores the
    saved ones). Keeps LambdaLR's names (`step`, `get_last_lr`, `state_dict` with `last_epoch`)."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: Config):
        self.opt = opt
        self.steps, self.warmup, self.cooldown = cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.cooldown
        self.settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.last_epoch = 0
        self._apply()
        self.used = self.get_last_lr()

    def _apply(self) -> None:
        m = lr_multiplier(self.last_epoch, self.steps, self.warmup, self.cooldown)
        for group, base in zip(self.opt.param_groups, self.settings):
            group.update(base)
            group["lr"] = base["lr"] * m

    def step(self) -> None:
        self.used = self.get_last_lr()  # what the optimizer step just taken ran with: what the logs show
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """The step count only (also from a checkpoint that saved a LambdaLR's state)."""
        self.last_epoch = int(state["last_epoch"])
        self._apply()
