"""``datasets``' habit of rebinding ``os.environ``, undone where the sweep's own process builds datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def same_os_environ() -> Iterator[None]:
    """Keep ``os.environ`` the object it was, with the contents ``datasets`` leaves.

    ``Dataset.map(num_proc=...)`` (datasets 5.0.1, ``arrow_dataset.py``) rebinds ``os.environ`` to a
    deep copy it took before the map. In the sweep's own process (tokenizing once, scoring the
    test split) whatever held the original mapping then changed a stale one: pytest's
    ``monkeypatch`` "restored" PYTHONPATH there, and the next test's trials still ran a previous
    test's injected training hook (a CI failure).
    """
    environ = os.environ
    try:
        yield
    finally:
        if os.environ is not environ:
            left = dict(os.environ)
            os.environ = environ  # noqa: B003 (the original object back; its contents are synced below)
            for key in [k for k in environ if k not in left]:
                del environ[key]
            for key, value in left.items():
                if environ.get(key) != value:
                    environ[key] = value
