"""bench.common.rounds: the order rotates, and each ratio is taken within one round."""

from __future__ import annotations

from collections.abc import Callable

from bench.common import Timed, rounds


def test_rounds_rotate_the_order_and_pair_runs_of_the_same_round() -> None:
    order: list[tuple[int, str]] = []

    def side(name: str, cost: float) -> Callable[[int], Timed]:
        def run(index: int) -> Timed:
            order.append((index, name))
            # a machine that slows down from round to round: round i costs (i + 1) times more
            return Timed(cost * (index + 1), cost * (index + 1))
        return run

    result = rounds(4, {"a": side("a", 2.0), "b": side("b", 1.0), "c": side("c", 1.5)})
    assert [name for _, name in order] == list("abc" "bca" "cab" "abc")
    assert [index for index, _ in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    # the drift cancels within a round: every round's ratio is the sides' own 2.0
    assert result.ratios("a", "b", "cpu") == "2.00 2.00 2.00 2.00"
    assert result.median_ratio("a", "c", "wall") == 2.0 / 1.5
    assert result.best("a") == Timed(2.0, 2.0)
