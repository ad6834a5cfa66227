"""One retry for the races of processes that start or finish together on a shared store.

Workers that start at once race to create a new store's tables (Optuna's, MLflow's); workers that
finish at once race to move the same registry alias. The loser's error names a constraint or a lock;
waiting a moment and trying again is the whole fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Text in a driver's error that means another process did the same thing at the same moment.
RACE_MARKERS = ("already exists", "UniqueViolation", "duplicate key", "IntegrityError", "locked")


def retry_races(action: Callable[[], T], attempts: int = 4, any_error: bool = False) -> T:
    """``action()``, again after 1, 2, 3... s while it fails with a race (any error with ``any_error``)."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a race and attempts are left
            if attempt == attempts - 1 or not (any_error or any(m in str(err) for m in RACE_MARKERS)):
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")  # pragma: no cover
