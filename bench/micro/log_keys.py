"""How many step positions of the dynamic maps' bin tables fall inside each key of a log-spaced key of the bin
(issue 14: could a table lookup by key replace the first levels of the bin search?).

    python bench/micro/log_keys.py

A key is monotone in the bin b: the bits of |b - 32767.5| - 0.5 as float16 (exact below 2048, rounded to nearest
above, as vcvtuw2ph does), shifted right, on either side of the middle. For each map and shift it prints the keys
used and, for the positions the search's levels 1-5 test (every eighth step position: 31 of them), the most that
fall strictly inside one key (a key lookup of the count below the key, plus that many compares, would replace those
five levels). A key lookup with one vpermt2b covers a range of 128 keys."""
import numpy as np

from pyquant.backends.code_tables import cached_code_table
from pyquant.functional import create_dynamic_map


def float16_bits(d: np.ndarray) -> np.ndarray:
    return np.asarray(d).astype(np.float16).view(np.uint16).astype(np.int64)


def key(b: np.ndarray, shift: int) -> np.ndarray:
    half = (float16_bits(np.array([32767]))[0] >> shift) + 1
    above = half + (float16_bits(np.maximum(b - 32768, 0)) >> shift)
    below = half - 1 - (float16_bits(np.maximum(32767 - b, 0)) >> shift)
    return np.where(b >= 32768, above, below)


def most_inside(table: np.ndarray, keys: np.ndarray, every: int) -> int:
    positions = np.minimum(np.searchsorted(table, np.arange(255), side="right"), 65535)  # first bin above index j
    tested = np.sort(positions[every - 1::every])
    count = np.searchsorted(tested, np.arange(65536), side="right")  # tested positions <= b
    return max(int(count[keys == k].max() - count[keys == k].min()) for k in np.unique(keys))


def main() -> None:
    bins = np.arange(65536)
    for signed in (True, False):
        table = cached_code_table(create_dynamic_map(signed)).numpy().astype(np.int64)
        for shift in (8, 9, 10):
            keys = key(bins, shift)
            assert (np.diff(keys) >= 0).all()
            print(f"{'signed' if signed else 'unsigned'} map, float16 bits >> {shift}: {len(np.unique(keys))} keys used of "
                  f"{keys.max() + 1}, "
                  f"at most {most_inside(table, keys, 8)} of the 31 level 1-5 positions inside one key")


if __name__ == "__main__":
    main()
