"""Post-import hooks: run ``fn(module)`` right after a module's first import.

An adapter loaded as a plugin at ``import verl`` must patch modules that verl imports
later (its workers, its engines) without importing them itself: that would pull the
whole training stack into every process that imports verl, in the middle of verl's own
``__init__``. A finder at the front of ``sys.meta_path`` wraps the real loader of the
named modules, so the patch lands before any code can use them.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from typing import Callable, Dict, List

__all__ = ["when_imported"]

Hook = Callable[[object], None]


def when_imported(name: str, fn: Hook) -> None:
    """Call ``fn(module)`` once module ``name`` is imported: now if it already is, else
    right after its code has run (before the importer gets it back)."""
    with _FINDER.lock:
        module = sys.modules.get(name)
        if module is None:
            _FINDER.hooks.setdefault(name, []).append(fn)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    fn(module)


class _HookLoader(importlib.abc.Loader):
    """The module's own loader, then the hooks."""

    def __init__(self, loader, hooks: List[Hook]):
        self._loader = loader
        self._hooks = hooks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for fn in self._hooks:
            fn(module)

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _HookFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.hooks: Dict[str, List[Hook]] = {}
        self.lock = threading.RLock()
        self._finding = set()

    def find_spec(self, name, path, target=None):
        with self.lock:
            if name not in self.hooks or name in self._finding:
                return None
            self._finding.add(name)
        try:
            # The other finders locate the module; this one only wraps its loader.
            spec = importlib.util.find_spec(name)
        finally:
            with self.lock:
                self._finding.discard(name)
        if spec is None or spec.loader is None:
            return None
        with self.lock:
            hooks = self.hooks.pop(name, None)
        if hooks is None:  # another thread took them meanwhile
            return None
        spec.loader = _HookLoader(spec.loader, hooks)
        return spec


_FINDER = _HookFinder()
