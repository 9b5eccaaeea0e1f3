"""What the live benchmarks ask: short user turns after real system prompts, the system prompts
chosen with a Zipf-like popularity so that prefixes repeat as they do in production."""

from __future__ import annotations

import random

# Zipf exponent of system-prompt popularity (rank r is chosen with weight 1 / (r + 1) ** s).
ZIPF_S = 0.8
QUESTIONS = [
    "Give me a short example.", "What should I do first?", "Summarise that in one line.",
    "What are the risks?", "How would you explain it to a beginner?", "What does it cost?",
    "List three alternatives.", "Why does that matter?", "Can you go into more detail?",
    "What is the most common mistake?", "How long will it take?", "Where do I start?",
]


def popularity(n: int, rng: random.Random) -> tuple[list[int], list[float]]:
    """A seeded popularity ranking of n system prompts: (the prompts by rank, the weight of
    each rank), for ``rng.choices(order, weights)``. Shuffles with ``rng``."""
    order = list(range(n))
    rng.shuffle(order)
    return order, [1.0 / (rank + 1) ** ZIPF_S for rank in range(n)]
