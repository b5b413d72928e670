"""Which records one epoch uses, and how often: repeats, fractional repeats and regularisation images.

`epoch_samples(records, seed, epoch)` lists the record indices of one epoch in record order (the
dataset shuffles them). Its length, `epoch_size(records)`, is the same every epoch, so steps per epoch,
schedules and resume positions stay fixed. The rules:

1. Training records (not `is_reg`): a record with repeats r is used floor(r) times. With integer
   repeats and no regularisation images this is the whole rule, exactly today's expand-repeats list.
2. Fractional repeats (EveryDream2's multiply.txt / a subset's `repeats = 1.5`): the fractions f_i of
   all training records are pooled, and each epoch K = round(sum f_i) of those records (halves round
   up) are used once more, none twice. EveryDream2 uses floor(sum f_i) and picks by passes of coin
   flips; we round to nearest, so one image with repeats 0.5 is not dropped for good, and pick by
   systematic sampling: the records in an order drawn from (seed, epoch, record key), intervals of
   length pi_i = f_i * K / sum f_i (capped at 1, the rest rescaled), points u, u+1, ..., u+K-1 with u
   drawn from (seed, epoch). A record is thus used in a pi_i share of the epochs (= f_i whenever the
   fractions sum to a whole number, as in 4 images x 1.5), and the picks are a pure function of
   (seed, epoch, record keys). Given `groups` (each record's bucket), the K picks are shared out first:
   each group gets floor(sum of its fractions) every epoch, and the picks left over go to groups drawn
   the same way in proportion to what their floors left out; then each group's records are drawn as
   above. So a bucket's sample count moves by at most one between epochs (the batch count by at most
   as many batches as buckets gained or lost one, evened out as data/dataset.py says) while every
   record keeps its share: three 0.5 images in three buckets give two samples every epoch, each image
   in two epochs of three.
3. Regularisation records (`is_reg`, whole repeats): kohya's DreamBoothDataset rule, on counts. With T
   training samples per epoch (rules 1-2), walk the reg records in order (data.reg_dir, then reg
   subsets; each sorted by path) adding each record's repeats until the running count reaches T;
   records not reached are not used (kohya warns "some of reg images are not used"; so does
   `reg_balance_note`), and the last one reached keeps all its repeats, so the count may pass T by up
   to its repeats - 1. If all of them together fall short of T, walk them again adding one use each,
   in order, until the count reaches T. The counts are the same every epoch (kohya fixes them once).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from fractions import Fraction
from math import floor

from difftune.data.records import ImageRecord


def epoch_samples(
    records: list[ImageRecord], seed: int, epoch: int, groups: Sequence[Hashable] | None = None
) -> list[int]:
    """Record indices of one epoch before shuffling: index i appears epoch_counts(...)[i] times.

    `groups` (one value per record, e.g. its bucket): the fractional repeats are shared out between the
    groups first, so a group's count moves by at most one between epochs (rule 2)."""
    return [i for i, count in enumerate(epoch_counts(records, seed, epoch, groups)) for _ in range(count)]


def epoch_counts(
    records: list[ImageRecord], seed: int, epoch: int, groups: Sequence[Hashable] | None = None
) -> list[int]:
    """How many times each record is used in `epoch` (the module docstring's rules)."""
    counts = [0 if r.is_reg else floor(Fraction(str(r.repeats))) for r in records]
    members: dict[Hashable, list[int]] = {}
    for i, r in enumerate(records):
        if not r.is_reg:
            members.setdefault(None if groups is None else groups[i], []).append(i)
    picks = _group_picks(records, members, seed, epoch)
    for group, indices in members.items():
        for i in _fraction_picks(records, indices, seed, epoch, group, picks[group]):
            counts[i] += 1
    for i, count in _reg_counts(records, sum(counts)).items():
        counts[i] = count
    return counts


def epoch_size(records: list[ImageRecord]) -> int:
    """Samples per epoch, the same for every epoch."""
    return sum(epoch_counts(records, 0, 0))


def reg_balance_note(records: list[ImageRecord]) -> str | None:
    """A warning when kohya's rule leaves regularisation images unused, else None."""
    reg = [i for i, r in enumerate(records) if r.is_reg]
    if not reg:
        return None
    counts = epoch_counts(records, 0, 0)
    unused = [records[i] for i in reg if counts[i] == 0]
    if not unused:
        return None
    train = sum(c for c, r in zip(counts, records, strict=True) if not r.is_reg)
    available = sum(int(records[i].repeats) for i in reg)
    return (
        f"{len(unused)} of {len(reg)} regularisation images are never used: they give {available} samples per epoch "
        f"(with repeats) and are balanced against the {train} training samples, so only the first ones in path "
        f"order are used (kohya's rule); e.g. {unused[0].path}. Lower their repeats or raise the training repeats"
    )


def _score(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _fractions(records: list[ImageRecord], indices: list[int]) -> dict[int, Fraction]:
    fractions = {}
    for i in indices:
        value = Fraction(str(records[i].repeats))
        if value != floor(value):
            fractions[i] = value - floor(value)
    return fractions


def _group_picks(records: list[ImageRecord], members: dict, seed: int, epoch: int) -> dict:
    """How many fractional picks each group gets this epoch (rule 2): floor of its own fractions' sum
    always, and the K - sum(floors) picks left over go to groups drawn in proportion to what their
    floors left out, by the same systematic sampling as the records."""
    totals = {g: sum(_fractions(records, indices).values(), Fraction(0)) for g, indices in members.items()}
    base = {g: floor(t) for g, t in totals.items()}
    left = floor(sum(totals.values(), Fraction(0)) + Fraction(1, 2)) - sum(base.values())
    remainders = {g: t - base[g] for g, t in totals.items() if t != base[g]}
    for g in _systematic(remainders, left, lambda g: (_score(seed, epoch, "group", g), str(g)),
                         Fraction(_score(seed, epoch, "groups"), 2**64)):
        base[g] += 1
    return base


def _fraction_picks(records: list[ImageRecord], indices: list[int], seed: int, epoch: int, group,
                    picks: int) -> list[int]:
    """Which of the training records `indices` (one group) are used once more this epoch for their
    fractional repeats: `picks` of them (rule 2)."""
    return _systematic(_fractions(records, indices), picks, lambda i: (_score(seed, epoch, records[i].key), i),
                       Fraction(_score(seed, epoch, "fraction", group), 2**64))


def _systematic(weights: dict, picks: int, order, point: Fraction) -> list:
    """`picks` distinct items, each chosen with probability weight · picks / sum(weights) (capped at 1,
    the rest rescaled), by systematic sampling: the items in `order`, intervals of those lengths,
    points point, point + 1, ... (point in [0, 1))."""
    total = sum(weights.values(), Fraction(0))
    if not picks or not total:
        return []
    share = {i: f * picks / total for i, f in weights.items()}
    certain: list = []
    while over := [i for i, p in share.items() if p >= 1]:  # a share of 1 or more cannot be sampled: take it
        certain += over
        rest = {i: weights[i] for i in share if i not in over}
        left, rest_total = picks - len(certain), sum(rest.values(), Fraction(0))
        share = {i: f * left / rest_total for i, f in rest.items()} if left and rest_total else {}
    chosen, edge = [], Fraction(0)
    for i in sorted(share, key=order):
        edge += share[i]
        while point < edge:  # at most once: every share is below 1
            chosen.append(i)
            point += 1
    return certain + chosen


def _reg_counts(records: list[ImageRecord], train_samples: int) -> dict[int, int]:
    """{reg record index: uses per epoch} by kohya's rule (rule 3), computed without kohya's loop."""
    reg = [i for i, r in enumerate(records) if r.is_reg]
    counts = dict.fromkeys(reg, 0)
    if not reg or train_samples <= 0:
        return counts
    running = 0
    for i in reg:  # the first pass: each record with its own repeats
        counts[i] = int(records[i].repeats)
        running += counts[i]
        if running >= train_samples:
            return counts
    rounds, extra = divmod(train_samples - running, len(reg))  # later passes: one use each, in order
    for n, i in enumerate(reg):
        counts[i] += rounds + (n < extra)
    return counts
