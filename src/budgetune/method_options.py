"""The base of every method's options. Each method module (methods/) subclasses it; config.py keeps
the chosen method's options in `Config.method`. Its own module so that methods/ never imports
config.py (config.py looks the method up in the registry: one direction only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MethodOptions:
    """Base of every method's options; each method module subclasses it (see methods/)."""

    name: str = "full"
