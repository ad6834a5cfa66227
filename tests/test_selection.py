"""The keep rules (objectives.selection): which point a trial keeps, one point at a time as the hook meets them."""

from __future__ import annotations

import pytest

from objectives.selection import KEEP_RULES, Keeper, Point, kept_point

# a curve that dips early by luck (step 64) and then hovers within its noise of that dip
NOISY = [Point(0, 5.0, 0.2), Point(32, 3.1, 0.2), Point(64, 2.92, 0.2), Point(96, 3.00, 0.2), Point(128, 2.95, 0.2)]


def test_best_keeps_the_first_lowest_point():
    assert kept_point(NOISY, "minimize", "best").step == 64
    tie = [Point(0, 2.0), Point(32, 1.0), Point(64, 1.0)]
    assert kept_point(tie, "minimize", "best").step == 32, "a tie is not better: the earlier point stays"


def test_latest_within_noise_keeps_the_last_point_near_the_best():
    assert kept_point(NOISY, "minimize", "latest_within_noise").step == 128
    worse = [*NOISY, Point(160, 3.5, 0.2)]  # worse than the best by more than its noise
    assert kept_point(worse, "minimize", "latest_within_noise").step == 128


def test_better_beyond_noise_moves_on_only_for_a_clear_gain():
    assert kept_point(NOISY, "minimize", "better_beyond_noise").step == 32  # 2.92 is within 0.2 of 3.1
    clear = [*NOISY, Point(160, 2.5, 0.2)]
    assert kept_point(clear, "minimize", "better_beyond_noise").step == 160


def test_maximize_mirrors_minimize():
    mirrored = [Point(p.step, -p.value, p.se) for p in NOISY]
    for rule in KEEP_RULES:
        assert kept_point(mirrored, "maximize", rule) == Point(*_neg(kept_point(NOISY, "minimize", rule)))


def _neg(p: Point) -> tuple:
    return p.step, -p.value, p.se


def test_without_errors_every_rule_is_best_and_nan_is_never_kept():
    bare = [Point(p.step, p.value) for p in NOISY]
    assert {kept_point(bare, "minimize", r).step for r in KEEP_RULES} == {64}
    assert kept_point([Point(0, float("nan"))], "minimize", "best") is None
    assert kept_point([Point(0, 3.0, 0.1), Point(32, float("nan"), 0.1)], "minimize", "latest_within_noise").step == 0


def test_offer_says_when_the_hook_saves_an_adapter():
    keeper = Keeper("minimize", "latest_within_noise")
    saved = [p.step for p in NOISY if keeper.offer(p)]
    assert saved == [0, 32, 64, 96, 128]
    keeper = Keeper("minimize", "best")
    assert [p.step for p in NOISY if keeper.offer(p)] == [0, 32, 64]


def test_an_unknown_rule_names_the_key():
    with pytest.raises(ValueError, match="objective.keep: expected one of best, better_beyond_noise"):
        Keeper("minimize", "newest")
