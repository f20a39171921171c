"""Evaluation metrics."""

import math


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a large number instead of overflowing to inf."""
    return math.exp(min(loss, 50.0))
