"""The base of every error a user can act on, and its recovery from Ray worker failures."""

from __future__ import annotations

import re
import traceback

_REMOTE = re.compile(r"^fusion\.[\w.]+?\.(\w+Error): (.+)$", re.MULTILINE)


class FusionError(ValueError):
    """A problem with the user's config, data or models: reported without a traceback."""


def user_error_from(error: BaseException) -> FusionError | None:
    """The FusionError a Ray worker raised, recovered from the exception Ray wraps it in.

    Ray Data re-raises a failed stage as its own exception type and keeps the original only
    in the formatted remote traceback (Ray Train: in each worker's failure), so the first
    ``fusion.<module>.<Name>Error: message`` line of it is the user's error.
    """
    texts = [str(error)]
    # Ray Train shortens the workers' tracebacks in its own message; it keeps each failure.
    for failure in getattr(error, "worker_failures", {}).values():
        texts += [str(failure), "".join(traceback.format_exception(failure))]
    for text in texts:
        match = _REMOTE.search(text)
        if match:
            return FusionError(match.group(2))
    return None
