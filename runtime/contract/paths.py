"""Where the bundled data (specs/, templates/) lives.

A wheel force-includes `specs/` and `templates/` under `compiler/_data/`; an
editable install or a plain checkout keeps them at the repository root, next
to `compiler/`. Everything that reads bundled data goes through here so both
layouts work.
"""

from __future__ import annotations

from pathlib import Path

# runtime/contract/ -> the repository root (a checkout) or the installed packages' folder.
_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The directory that holds `specs/` and `templates/`.

    In a checkout this is the repository root; in an installed wheel it is
    `compiler/_data/`, which carries the same two folders.
    """
    bundled = _ROOT / "compiler" / "_data"
    if bundled.is_dir():
        return bundled
    return _ROOT


def specs_dir() -> Path:
    """The `specs/` folder: model, hardware and asset catalogs plus example recipes."""
    return repo_root() / "specs"


def templates_dir() -> Path:
    """The `templates/` folder the build step renders from."""
    return repo_root() / "templates"
