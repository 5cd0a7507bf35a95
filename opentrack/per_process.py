"""One instance per process: clients with threads or sockets must be created after the web
server forks its workers, never inherited from the parent."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._instances: dict[int, T] = {}
        self._lock = threading.Lock()

    def __call__(self) -> T:
        pid = os.getpid()
        instance = self._instances.get(pid)
        if instance is None:
            with self._lock:
                instance = self._instances.get(pid)
                if instance is None:
                    instance = self._instances[pid] = self._factory()
        return instance

    def existing(self) -> T | None:
        """This process's instance if one was made (for shutdown), without making one."""
        return self._instances.get(os.getpid())
