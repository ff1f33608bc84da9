"""Datasets built from registry packages (npm, Debian), written in the ``folder`` layout.

    python -m ddtas_lightning.data.prepare emoji [--classes N] [--size PX] [--data-dir data] [--source PATH]
    python -m ddtas_lightning.data.prepare cjk_fonts [--classes N] [--size PX] [--data-dir data] [--source PATH]

Each builder lives in its own module (imported only when its command runs, so ``prepare --help`` stays
light); :mod:`.common` holds what they share (staged write, manifest, content hash, progress, tools).
See docs/real_data.md.
"""

# name -> "module:function" of the builder's CLI entry point (argv without the builder name -> exit code)
BUILDERS = {
    "emoji": "ddtas_lightning.data.builders.emoji:main",
    "cjk_fonts": "ddtas_lightning.data.builders.cjk_fonts:main",
}


def run_builder(name: str, argv: list[str]) -> int:
    """Import builder ``name`` and run its CLI on ``argv``; returns the exit code."""
    import importlib

    module, func = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), func)(argv)
