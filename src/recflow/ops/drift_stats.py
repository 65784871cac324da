"""The drift check's statistics: per column a distance, its null distribution from permuting users between the
two windows, and an effect size an operator can read (recflow.ops.drift decides with them).

Why a permutation null and not Evidently's p-value tests: the rows of a window are not independent. The events of
one user share that user's taste and activity, so a chi-square or K-S test on event rows takes a window of 45 users
and 4,000 events for 4,000 independent draws and flags the difference between two random groups of users. Here the
unit that is drawn is the user (more exactly the user's rows in one window, a "block"): the null distribution of a
column's distance is the distance between two windows made by dealing the pooled blocks at random into groups of
the two windows' sizes, so it widens by itself when a window holds few users, and it narrows when it holds many.

Every user weighs the same: a column's distribution in a window is the average of its users' own distributions (a
user with 300 events in the week counts as much as one with 3), the statistic that matches the unit the null
resamples. Pooling the events instead lets the few heaviest users of a small window decide the window's shares, and
their taste is exactly the noise the null then has to allow for: on ml-100k weeks of 33-59 users, the current week
taken five months later (new releases in the average user's ratings) is missed in 5 of 40 weeks with pooled events
and in none with users weighted equally, at the same false-alarm rate (benchmarks/bench_drift_real.py).

Distances (the same as Evidently's methods of these names, on a sample that weighs users the same way, so its
report agrees):
- categorical columns: Jensen-Shannon distance (natural log) between the two windows' category shares;
- numerical columns: Wasserstein distance between the two windows' values divided by the pooled standard deviation,
  computed on the distinct values, or on `bins` pooled quantile bins (at the bin's mean value) when there are more.

Columns read against a window's own lookback (an item's popularity bucket, whether it or its user is new) give the
same row a different value in each window: the reference window reads it against its lookback, the current window
against its own. A re-deal gives each row the value of the window it is dealt to (`reference_as_current`,
`current_as_reference`), so the null holds the two lookbacks' own difference (which items each happens to hold), as
the observed distance does; keeping each row's value instead leaves that difference out of the null and flags it (on
ml-100k weeks, item_popularity's p-value was below 0.05 in 22% of random user splits). This is exact only when
neither lookback holds either window's events (recflow.ops.drift ends each lookback a reference window before its
window): then the lookbacks are the same in every re-deal.

One family per data set: a column is significant when its p-value, adjusted for the data set's other columns by
the min-p permutation method (Westfall and Young: the same permutations for every column, so correlated columns
such as new_item and item_popularity do not count twice), is below `alpha`. It drifts when it is also at least
`min_effect` away: a floor that only matters where samples are large enough that a negligible move is significant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

CATEGORICAL, NUMERICAL = "categorical", "numerical"
METHODS = {CATEGORICAL: "jensenshannon", NUMERICAL: "wasserstein"}
_CHUNK = 256  # permutations per matrix product (memory: chunk x blocks floats)


@dataclass(frozen=True)
class ColumnDrift:
    """One column's verdict and how much it moved."""

    column: str
    kind: str  # categorical or numerical
    method: str  # jensenshannon or wasserstein (normalised by the pooled std)
    score: float  # the distance between the windows
    null_median: float  # the distance two random groups of the same sizes typically have
    critical: float  # the distance the column needed to drift: max(permutation critical value, min_effect)
    min_effect: float
    p_value: float  # adjusted for the data set's other columns (min-p permutation), resolution 1/(permutations+1)
    drifted: bool
    reference: str  # readable summaries of the column in each window
    current: str


def permutation_test(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    alpha: float,
    min_effect: Mapping[str, float],
    permutations: int,
    bins: int,
    seed: int,
    reference_as_current: pd.DataFrame | None = None,
    current_as_reference: pd.DataFrame | None = None,
) -> list[ColumnDrift]:
    """Test every column of `reference` against `current`; a frame's index names the user of each row (rows of one
    user in one window move together). Object/category columns are categorical, the rest numerical.

    `reference_as_current` / `current_as_reference`: the same rows (same index, in the same order) as the other window
    reads them, for the columns whose value depends on the window a row is in; a re-deal gives each row the value of
    the window it is dealt to. A column they do not hold reads the same in both windows."""
    ref_units = pd.factorize(reference.index)[0]
    cur_units = pd.factorize(current.index)[0]
    n_ref = int(ref_units.max()) + 1 if len(ref_units) else 0
    n_cur = int(cur_units.max()) + 1 if len(cur_units) else 0
    units = np.concatenate([ref_units, cur_units + n_ref])
    columns = list(reference.columns)
    swapped = _swapped(reference, current, reference_as_current, current_as_reference)
    encoded = [_encode([reference[c], current[c], *[frame[c] for frame in swapped.get(c, ())]], bins) for c in columns]
    # per column, a blocks x categories (or bins) matrix of each user's shares as the reference window reads its rows,
    # and one as the current window reads them; all columns side by side, one product per chunk
    n_rows = len(reference) + len(current)
    as_ref, as_cur = [], []
    for codes, positions, _ in encoded:
        mine = _block_counts(units, codes[:n_rows], n_ref + n_cur, len(positions))
        if len(codes) == n_rows:  # the same in both windows
            as_ref.append(mine)
            as_cur.append(mine)
            continue
        theirs = _block_counts(units, codes[n_rows:], n_ref + n_cur, len(positions))  # the same rows, swapped reading
        as_ref.append(np.vstack([mine[:n_ref], theirs[n_ref:]]))
        as_cur.append(np.vstack([theirs[:n_ref], mine[n_ref:]]))
    ref_side = np.hstack(as_ref)
    cur_side = np.hstack(as_cur) if swapped else ref_side
    cur_total = cur_side.sum(axis=0)
    pooled = ref_side.sum(axis=0) + cur_total  # the same in every re-deal: the numbers' pooled std
    offsets = np.cumsum([0] + [len(pos) for _, pos, _ in encoded])

    def distances(assign: np.ndarray) -> np.ndarray:
        """Every column's distance (columns) for each re-deal (rows of `assign`: 1 = dealt to the reference window)."""
        ref_counts = assign @ ref_side
        cur_counts = cur_total - (assign @ cur_side if swapped else ref_counts)
        return np.stack(
            [_distance(ref_counts, cur_counts, pooled, offsets, i, e) for i, e in enumerate(encoded)], axis=1
        )

    observed = distances(np.repeat([1.0, 0.0], [n_ref, n_cur])[None, :])[0]
    rng = np.random.default_rng(seed)
    null = np.empty((permutations, len(columns)))
    for start in range(0, permutations, _CHUNK):
        size = min(_CHUNK, permutations - start)
        chosen = np.argpartition(rng.random((size, n_ref + n_cur)), n_ref, axis=1)[:, :n_ref]
        assign = np.zeros((size, n_ref + n_cur))
        np.put_along_axis(assign, chosen, 1.0, axis=1)
        null[start : start + size] = distances(assign)
    p_values, critical = _min_p(observed, null, alpha)
    out = []
    for i, column in enumerate(columns):
        floor = float(min_effect.get(column, 0.0))
        kind = encoded[i][2]
        summaries = summarize(reference[column], current[column])
        out.append(
            ColumnDrift(
                column=column,
                kind=kind,
                method=METHODS[kind],
                score=round(float(observed[i]), 5),
                null_median=round(float(np.median(null[:, i])), 5),
                critical=round(max(float(critical[i]), floor), 5),
                min_effect=floor,
                p_value=round(float(p_values[i]), 5),
                drifted=bool(p_values[i] < alpha and observed[i] >= floor),
                reference=summaries[0],
                current=summaries[1],
            )
        )
    return out


def _swapped(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    reference_as_current: pd.DataFrame | None,
    current_as_reference: pd.DataFrame | None,
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """column -> (reference rows as the current window reads them, current rows as the reference reads them), for
    the columns the two windows read differently; checked to be the same rows."""
    if reference_as_current is None and current_as_reference is None:
        return {}
    if reference_as_current is None or current_as_reference is None:
        raise ValueError("give both reference_as_current and current_as_reference, or neither")
    pairs = {"reference": (reference, reference_as_current), "current": (current, current_as_reference)}
    for label, (mine, theirs) in pairs.items():
        if not theirs.index.equals(mine.index):
            raise ValueError(f"the {label} window's rows as the other window reads them are not its rows (index)")
    both = [c for c in reference.columns if c in reference_as_current.columns and c in current_as_reference.columns]
    return {c: (reference_as_current, current_as_reference) for c in both}


def _encode(values: list[pd.Series], bins: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Codes of the pooled values (-1: missing, left out), the positions of the codes (numerical: the value, or the
    bin's mean value when there are more than `bins` distinct values; categorical: 0..k-1) and the column's kind."""
    pooled = pd.concat(values, ignore_index=True)
    if _is_categorical(pooled):
        codes, uniques = pd.factorize(pooled.astype(str).where(pooled.notna()), sort=True)
        return codes, np.arange(len(uniques), dtype=np.float64), CATEGORICAL
    values = pooled.to_numpy(dtype=np.float64)
    present = np.isfinite(values)
    codes = np.full(len(values), -1, dtype=np.int64)
    distinct = np.unique(values[present])
    if len(distinct) <= bins:
        codes[present] = np.searchsorted(distinct, values[present])
        return codes, distinct, NUMERICAL
    edges = np.unique(np.quantile(values[present], np.linspace(0, 1, bins + 1)[1:-1]))
    codes[present] = np.searchsorted(edges, values[present], side="right")
    sums = np.bincount(codes[present], weights=values[present], minlength=len(edges) + 1)
    sizes = np.bincount(codes[present], minlength=len(edges) + 1)
    return codes, sums / np.maximum(sizes, 1), NUMERICAL


def _is_categorical(values: pd.Series) -> bool:
    return values.dtype == object or isinstance(values.dtype, pd.CategoricalDtype)


def _block_counts(units: np.ndarray, codes: np.ndarray, n_blocks: int, width: int) -> np.ndarray:
    """Each block's (user's) distribution over the codes: its counts divided by its rows with a value, so every user
    weighs 1 (a user without a value in this column weighs 0)."""
    keep = codes >= 0
    flat = np.bincount(units[keep] * width + codes[keep], minlength=n_blocks * width)
    counts = flat.reshape(n_blocks, width).astype(np.float64)
    counts /= np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return counts


def _distance(
    ref_counts: np.ndarray,
    cur_counts: np.ndarray,
    pooled: np.ndarray,
    offsets: np.ndarray,
    i: int,
    encoded: tuple[np.ndarray, np.ndarray, str],
) -> np.ndarray:
    """Column i's distance for each row of `ref_counts` / `cur_counts` (the two windows' counts in one re-deal);
    numbers are scaled by the std of `pooled`, the same in every re-deal."""
    _, positions, kind = encoded
    ref = ref_counts[:, offsets[i] : offsets[i + 1]]
    cur = cur_counts[:, offsets[i] : offsets[i + 1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = ref / ref.sum(axis=1, keepdims=True)
        q = cur / cur.sum(axis=1, keepdims=True)
        if kind == CATEGORICAL:
            m = (p + q) / 2
            kl = np.where(p > 0, p * np.log(p / m), 0.0) + np.where(q > 0, q * np.log(q / m), 0.0)
            result = np.sqrt(np.maximum(kl.sum(axis=1) / 2, 0.0))
        else:
            weights = pooled[offsets[i] : offsets[i + 1]]
            mean = (weights * positions).sum() / max(weights.sum(), 1.0)
            std = np.sqrt((weights * (positions - mean) ** 2).sum() / max(weights.sum(), 1.0))
            gaps = np.diff(positions)
            cdf_gap = np.abs(np.cumsum(p, axis=1) - np.cumsum(q, axis=1))[:, :-1]
            result = (cdf_gap * gaps).sum(axis=1) / max(std, 1e-3)
    return np.asarray(np.nan_to_num(result, nan=0.0), dtype=np.float64)


def _min_p(observed: np.ndarray, null: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Westfall-Young min-p: each column's p-value adjusted for all columns of the family, and the distance each
    column needed to reach `alpha` (its null quantile at the family's per-column level)."""
    b = len(null)
    ordered = np.sort(null, axis=0)
    raw = (1 + b - _rank(ordered, observed[None, :])[0]) / (b + 1)  # share of the null >= observed
    null_p = (b - _rank(ordered, null)) / b  # the same for every permutation, against the others
    min_p = null_p.min(axis=1)
    adjusted = (1 + (min_p[:, None] <= raw[None, :]).sum(axis=0)) / (b + 1)
    level = float(np.quantile(min_p, alpha))
    critical = np.quantile(null, min(1.0, max(0.0, 1.0 - level)), axis=0)
    return np.minimum(adjusted, 1.0), critical


def _rank(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per column, how many of `ordered` (sorted ascending per column) are strictly below each value."""
    return np.stack([np.searchsorted(ordered[:, c], values[:, c], side="left") for c in range(ordered.shape[1])], 1)


def summarize(reference: pd.Series, current: pd.Series, *, top: int = 3) -> tuple[str, str]:
    """A column in each window, readable and weighted as the test weighs it (every user the same; the index names
    the user): the shares of the `top` categories that moved most, or mean / median / p90 of the numbers."""
    if _is_categorical(reference) or _is_categorical(current):
        ref, cur = _shares(reference), _shares(current)
        moved = ref.sub(cur, fill_value=0.0).abs().sort_values(ascending=False, kind="stable").index[:top]
        return tuple(", ".join(f"{k} {s.get(k, 0.0):.1%}" for k in moved) for s in (ref, cur))  # type: ignore[return-value]
    return _numbers(reference), _numbers(current)


def _shares(values: pd.Series) -> pd.Series:
    """Category -> the average over users of the user's share of it."""
    if values.empty:
        return pd.Series(dtype=np.float64)
    return pd.crosstab(values.index, values.astype(str).to_numpy(), normalize="index").mean()


def _numbers(values: pd.Series) -> str:
    numbers = values.to_numpy(dtype=np.float64)
    present = np.isfinite(numbers)
    if not present.any():
        return "no values"
    numbers = numbers[present]
    users = pd.factorize(values.index[present])[0]
    weights = 1.0 / np.bincount(users)[users]  # each user's values weigh 1 in all
    order = np.argsort(numbers, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    median, p90 = (numbers[order][np.searchsorted(cumulative, q)] for q in (0.5, 0.9))
    mean = float(np.average(numbers, weights=weights))
    return f"mean {mean:.3g}, median {median:.3g}, p90 {p90:.3g}"
