"""Hard-negative mining (placeholder header; filled in below)."""

from __future__ import annotations


def decontaminate_main(argv: list[str] | None = None) -> int:
    """``conretriever decontaminate``: see :mod:`conretriever.decontam`."""
    from conretriever.decontam import main as decontam_main

    return decontam_main(argv)
