"""The four MRI modalities and the subsets of them a model may see.

One home for modality names, indices and the `--mode` syntax, shared by the data layer,
the model, training and evaluation. A *subset* is a sorted tuple of modality indices,
e.g. ``(0, 2)`` for FLAIR + T1ce.
"""
import itertools
import random

MODALITIES = ("flair", "t1", "t1ce", "t2")  # channel order of every image tensor
# BraTS 2023's names of the same four (its files' suffixes, accepted in --mode too)
BRATS_2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
FULL = tuple(range(len(MODALITIES)))
T1CE = MODALITIES.index("t1ce")  # the image the released K-means post-processing rule reads

# The 15 non-empty subsets: singles first, then pairs, triples and the full set.
ALL_SUBSETS = tuple(
    s for k in range(1, len(MODALITIES) + 1) for s in itertools.combinations(FULL, k)
)
SINGLE_SUBSETS = tuple(s for s in ALL_SUBSETS if len(s) == 1)
# eval.py --mode available (each case with the modalities it has), and its mask folder
AVAILABLE = "available"


SUBSET_SYNTAX = (f"give indices 0-3 or names {', '.join(MODALITIES)} (BraTS 2023's "
                 f"{', '.join(BRATS_2023_NAMES.values())}), each once, separated by commas (e.g. "
                 "0,2 or flair,t1ce)")


def parse_subset(text):
    """'0,2' or 'flair,t1ce' (or BraTS 2023's 't2f,t1c', or a mix) -> (0, 2). Raises
    ValueError on anything else: a repeated modality or an empty item ('0,0', 'flair,0', '0,,2')
    is a typo, not the smaller subset it would otherwise be read as."""
    tokens = [token.strip().lower() for token in str(text).replace("+", ",").split(",")]
    if tokens == [""]:
        raise ValueError(f"no modality given: {SUBSET_SYNTAX}")
    indices = []
    for token in tokens:
        if not token:
            raise ValueError(f"an empty item in the modality subset {text!r}: {SUBSET_SYNTAX}")
        if token.isdigit() and int(token) < len(MODALITIES):
            index = int(token)
        elif token in MODALITIES:
            index = MODALITIES.index(token)
        elif token in BRATS_2023_NAMES.values():
            index = MODALITIES.index(next(m for m, name in BRATS_2023_NAMES.items() if name == token))
        else:
            raise ValueError(f"unknown modality {token!r} in {text!r}: {SUBSET_SYNTAX}")
        if index in indices:
            raise ValueError(f"modality {MODALITIES[index]} given twice in {text!r}: {SUBSET_SYNTAX}")
        indices.append(index)
    return tuple(sorted(indices))


def parse_mode(text):
    """`--mode` value -> 'random', 'all' (the 15 subsets) or one subset tuple.

    Published spellings are accepted too: 'random' and the full set '0,1,2,3'.
    """
    text = str(text).strip().lower()
    if text in ("random", "all"):
        return text
    return parse_subset(text)


def parse_teachers(text):
    """`--teachers '0'` or `'flair,t1ce'` -> (0,) / (0, 2); empty string -> ()."""
    return parse_subset(text) if str(text).strip() else ()


def subset_name(subset):
    """(0, 2) -> 'flair+t1ce' (used for folder names and table rows)."""
    return "+".join(MODALITIES[i] for i in subset)


# The folders eval.py writes masks into: one per subset, and --mode available's.
MASK_FOLDERS = tuple(subset_name(s) for s in ALL_SUBSETS) + (AVAILABLE,)


def sample_subset(rng: random.Random):
    """Published random-missing draw: k uniform in {1, 2, 3}, then k modalities uniformly."""
    k = rng.choice((1, 2, 3))
    return tuple(sorted(rng.sample(FULL, k)))
