"""The result type shared by every sequence aligner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alignment:
    """Which source positions stand for which target positions.

    ``target_to_source[j]`` is the sorted list of source positions matched to target position
    ``j`` (``source_to_target`` the converse). ``cost`` is the DTW total cost, or for an
    offset alignment the number of target positions left without a source position.
    """

    cost: float
    target_to_source: list[list[int]]
    source_to_target: list[list[int]]


def invert(matches: list[list[int]], size: int) -> list[list[int]]:
    """Turn ``a_to_b`` lists into sorted ``b_to_a`` lists for ``size`` positions of ``b``."""
    inverse: list[list[int]] = [[] for _ in range(size)]
    for a, bs in enumerate(matches):
        for b in bs:
            inverse[b].append(a)
    return inverse


def check_tokens(name: str, tokens: object) -> list[str]:
    """Return ``tokens`` as a list of strings, or raise ValueError naming the argument."""
    if isinstance(tokens, str):
        raise ValueError(f"{name} must be a sequence of token strings, not one string")
    tokens = list(tokens)  # type: ignore[call-overload]
    if not tokens:
        raise ValueError(f"{name} is empty: an alignment needs at least one token on each side")
    for position, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ValueError(f"{name}[{position}] is {type(token).__name__}, not a token string")
    return tokens
