"""User errors raised inside Ray workers reach the CLI as their own one-line message."""

from __future__ import annotations

from ray.train import WorkerGroupError

from fusion.data.corpus import CorpusError
from fusion.errors import user_error_from


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


def test_a_worker_failure_kept_by_ray_train_is_recovered():
    inner = _raised(CorpusError("x.jsonl: not valid UTF-8 at byte 3"))
    wrapped = WorkerGroupError("[Rank 0 Error Snippet]: ... (Output truncated) ...", {0: inner})
    assert str(user_error_from(wrapped)) == "x.jsonl: not valid UTF-8 at byte 3"


def test_errors_that_are_not_the_users_stay_unrecognised():
    assert user_error_from(_raised(RuntimeError("worker died"))) is None
    wrapped = WorkerGroupError("snippet", {0: _raised(MemoryError("out of memory"))})
    assert user_error_from(wrapped) is None
