"""Training health: flags what a person watching the curves would flag, as it happens.

    loss_spike          the step's loss above `spike` x the median of the last `window` steps
    grad_explosion      the gradient norm above `explosion` x its recent median
    non_finite          a NaN/Inf loss or gradient (the loop also skips that step)
    throughput_drop     tokens/s below `slowdown` x its recent median for `sustain` steps in a row (a single
                        slow step on a shared machine is not an alarm); flagged once per drop
    data_stall          drawing the step's batches took longer than the step itself (and over 50 ms)

Each flag is a metrics record `{"step": N, "event": "health", "kind": ..., "detail": ...}`, a warning line on the
console, and a marker in the report.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class HealthMonitor:
    window: int = 20
    spike: float = 2.0
    explosion: float = 10.0
    slowdown: float = 0.5
    """0 turns the throughput check off (rollout stages alternate sampling and updates)."""
    sustain: int = 5
    """Slow steps in a row before a throughput drop is flagged."""
    min_gap: float = 0.5
    """A loss spike must also exceed the median by this much (RL losses hover around 0)."""
    stall: bool = True
    """Check data stalls (off where drawing a batch is sampling a rollout)."""
    warmup: int = 5
    """Steps observed before anything is flagged."""
    _loss: deque = field(default_factory=lambda: deque(maxlen=20))
    _norm: deque = field(default_factory=lambda: deque(maxlen=20))
    _tps: deque = field(default_factory=lambda: deque(maxlen=20))
    _slow: int = 0

    def check(
        self, step: int, loss: float, norm: float, tokens_per_s: float | None, fetch_s: float, step_s: float
    ) -> list[dict]:
        """The flags raised by this step (and remember it)."""
        flags = []

        def flag(kind: str, detail: str) -> None:
            flags.append({"step": step, "event": "health", "kind": kind, "detail": detail})

        if not (math.isfinite(loss) and math.isfinite(norm)):
            flag("non_finite", f"loss {loss}, gradient norm {norm}")
        ready = len(self._loss) >= self.warmup
        if ready and math.isfinite(loss):
            med = statistics.median(self._loss)
            if med > 0 and loss > self.spike * med and loss - med > self.min_gap:
                flag("loss_spike", f"loss {loss:.4g} against a recent median of {med:.4g}")
        if ready and math.isfinite(norm):
            med = statistics.median(self._norm)
            if med > 0 and norm > self.explosion * med:
                flag("grad_explosion", f"gradient norm {norm:.4g} against a recent median of {med:.4g}")
        if self.slowdown > 0 and tokens_per_s is not None and len(self._tps) >= 3:
            med = statistics.median(self._tps)
            self._slow = self._slow + 1 if tokens_per_s < self.slowdown * med else 0
            if self._slow == self.sustain:
                flag(
                    "throughput_drop",
                    f"{tokens_per_s:,.0f} tokens/s against a recent median of {med:,.0f}, "
                    f"{self.sustain} steps in a row",
                )
        if self.stall and fetch_s > max(step_s, 0.05) and step > 1:
            flag("data_stall", f"drawing the batches took {fetch_s:.2f} s, the step {step_s:.2f} s")
        if math.isfinite(loss):
            self._loss.append(loss)
        if math.isfinite(norm):
            self._norm.append(norm)
        if tokens_per_s is not None:
            self._tps.append(tokens_per_s)
        return flags
