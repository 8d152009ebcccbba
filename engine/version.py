"""The version string: the installed distribution's, else the source tree's."""

from __future__ import annotations

from importlib import metadata

try:
    __version__: str = metadata.version("volley")
except metadata.PackageNotFoundError:
    # Running from a checkout (`python -m engine` without `pip install -e .`).
    __version__ = "0.1.0"
