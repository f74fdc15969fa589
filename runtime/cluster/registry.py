"""This process's request routers (runtime/cluster/router.py), for /health.

A module of its own: Ray Serve pickles the router's module by value, so a registry defined there would be a
copy; this one is imported by reference and is the same object in the router and in the server."""

from __future__ import annotations

import weakref

ROUTERS: weakref.WeakSet = weakref.WeakSet()
