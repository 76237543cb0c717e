import random

import pytest

from utils.modalities import (
    ALL_SUBSETS, FULL, MODALITIES, SINGLE_SUBSETS, parse_mode, parse_subset, parse_teachers,
    sample_subset, subset_name,
)


def test_fifteen_distinct_nonempty_subsets():
    assert len(ALL_SUBSETS) == 15 == len(set(ALL_SUBSETS))
    assert all(s == tuple(sorted(s)) and 1 <= len(s) <= 4 for s in ALL_SUBSETS)
    assert SINGLE_SUBSETS == ((0,), (1,), (2,), (3,))
    assert ALL_SUBSETS[-1] == FULL == (0, 1, 2, 3)


@pytest.mark.parametrize("text, expected", [
    ("0,2", (0, 2)), ("flair,t1ce", (0, 2)), ("T1CE, flair", (0, 2)), ("flair+t2", (0, 3)),
    ("0,1,2,3", FULL), ("3", (3,)), ("t1", (1,)),
    # BraTS 2023's names: t2f FLAIR, t1n T1, t1c T1ce, t2w T2
    ("t2f,t1c", (0, 2)), ("T1N+t2w", (1, 3)), ("t2f,t1n,t1c,t2w", FULL), ("flair,t1c", (0, 2)),
])
def test_parse_subset(text, expected):
    assert parse_subset(text) == expected


@pytest.mark.parametrize("text", ["", "4", "t3", "flair,dwi", ","])
def test_parse_subset_rejects(text):
    with pytest.raises(ValueError, match="modality"):
        parse_subset(text)


SYNTAX = ("give indices 0-3 or names flair, t1, t1ce, t2 (BraTS 2023's t2f, t1n, t1c, t2w), each "
          "once, separated by commas (e.g. 0,2 or flair,t1ce)")


@pytest.mark.parametrize("text, problem", [
    ("0,0", "modality flair given twice in '0,0'"),
    ("flair,flair", "modality flair given twice in 'flair,flair'"),
    ("t1ce,0,2", "modality t1ce given twice in 't1ce,0,2'"),  # a name and its index
    ("flair,t2f", "modality flair given twice in 'flair,t2f'"),  # BraTS 2023's name of FLAIR
    ("0,,2", "an empty item in the modality subset '0,,2'"),
    ("0,2,", "an empty item in the modality subset '0,2,'"),
    ("", "no modality given"), (" ", "no modality given"),
])
def test_a_repeated_modality_or_an_empty_item_is_refused(text, problem):
    # Read before as the de-duplicated subset: '0,0' ran FLAIR alone, '0,,2' FLAIR + T1ce.
    with pytest.raises(ValueError) as error:
        parse_subset(text)
    assert str(error.value) == f"{problem}: {SYNTAX}"


def test_parse_mode_and_teachers():
    assert parse_mode("random") == "random"
    assert parse_mode("ALL") == "all"
    assert parse_mode("0,1,2,3") == FULL
    assert parse_teachers("") == ()
    assert parse_teachers("0") == (0,)


def test_names_and_masks_round_trip():
    for s in ALL_SUBSETS:
        assert parse_subset(subset_name(s)) == s
    assert subset_name((0, 2)) == "flair+t1ce"
    assert len(MODALITIES) == 4


def test_sample_subset_follows_published_draw():
    rng = random.Random(0)
    draws = [sample_subset(rng) for _ in range(6000)]
    sizes = [len(s) for s in draws]
    # k uniform in {1, 2, 3}; the full set is never drawn.
    for k in (1, 2, 3):
        assert abs(sizes.count(k) / len(draws) - 1 / 3) < 0.03
    assert FULL not in draws
    # Each modality present with probability E[k]/4 = 0.5.
    for m in FULL:
        assert abs(sum(m in s for s in draws) / len(draws) - 0.5) < 0.03
    # Seeded: the same seed replays the same draws.
    replay = random.Random(0)
    assert [sample_subset(replay) for _ in range(50)] == draws[:50]
