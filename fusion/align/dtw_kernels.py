"""The DTW recursion and traceback compiled with numba, loaded only when DTW first runs.

Kept apart so that importing ``fusion.align`` loads neither numba nor llvmlite: vLLM's CPU
platform scans every loaded module when its engine starts and fails on llvmlite's library
wrapper, so a process that builds a vLLM engine must not have imported them.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def accumulate(pair_cost, source_index, target_index, total):  # pragma: no cover - compiled
    """Fill ``total`` with the DTW recursion; cell cost = pair_cost[source id, target id]."""
    n, m = source_index.shape[0], target_index.shape[0]
    row = pair_cost[source_index[0]]
    total[0, 0] = row[target_index[0]]
    for j in range(1, m):
        total[0, j] = total[0, j - 1] + row[target_index[j]]
    for i in range(1, n):
        row = pair_cost[source_index[i]]
        total[i, 0] = total[i - 1, 0] + row[target_index[0]]
        for j in range(1, m):
            best = total[i - 1, j - 1]
            up = total[i - 1, j]
            left = total[i, j - 1]
            if up < best:
                best = up
            if left < best:
                best = left
            total[i, j] = best + row[target_index[j]]


@numba.njit(cache=True, nogil=True)
def traceback(total, up_before_left):  # pragma: no cover - compiled
    """Walk back from the last cell; ties prefer diag, then up/left in the given order."""
    n, m = total.shape
    path_source = np.empty(n + m - 1, np.int64)
    path_target = np.empty(n + m - 1, np.int64)
    i, j, k = n - 1, m - 1, 0
    while i > 0 or j > 0:
        path_source[k] = i
        path_target[k] = j
        k += 1
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            if diag <= up and diag <= left:
                i -= 1
                j -= 1
            elif up_before_left:
                if up <= left:
                    i -= 1
                else:
                    j -= 1
            elif left <= up:
                j -= 1
            else:
                i -= 1
    path_source[k] = 0
    path_target[k] = 0
    return path_source[: k + 1][::-1], path_target[: k + 1][::-1]
