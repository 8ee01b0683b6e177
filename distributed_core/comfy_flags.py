"""The command-line flags that a ComfyUI folder offers, read from its ``comfy/cli_args.py`` as text:
never imported and no process started, so reading them is cheap and safe.

They decide what an instance of that ComfyUI may be given: a flag it does not declare makes its
argparse exit at start (0.38 removed ``--normalvram`` and ``--disable-ipex-optimize``), and the
storage flags it has (``--disable-assets`` in 0.38, ``--database-url`` since 2025) decide how the
launcher keeps local instances of one folder off each other's database.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CLI_ARGS = Path("comfy") / "cli_args.py"
# add_argument("--name", ...) and add_argument("-x", "--name", ...), however the call is wrapped
_CALL = re.compile(r"""add_argument\(\s*((?:["']-{1,2}[\w-]+["']\s*,?\s*)+)""")
_NAME = re.compile(r"""["'](-{1,2}[\w-]+)["']""")
_VERSION = re.compile(r"""__version__\s*=\s*["']([^"']{1,40})["']""")


@dataclass(frozen=True)
class ComfyFlags:
    folder: Path
    version: str                       # "0.3.64"; "" when the folder does not say
    declared: frozenset[str] | None    # None when cli_args.py cannot be read

    @property
    def where(self) -> str:
        """The ComfyUI, as a message names it."""
        return f"ComfyUI {self.version} in {self.folder}" if self.version else f"the ComfyUI in {self.folder}"

    def declares(self, flag: str) -> bool:
        """Whether this ComfyUI is known to take the flag (False when its flags are unknown)."""
        return self.declared is not None and flag in self.declared

    def lacks(self, flag: str) -> bool:
        """Whether this ComfyUI is known not to take the flag (False when its flags are unknown)."""
        return self.declared is not None and flag not in self.declared

    def given(self, words: list[str]) -> set[str]:
        """The declared flags that these words set, abbreviations included, as argparse reads them."""
        if self.declared is None:
            return set()
        found = set()
        for word in words:
            name = word.partition("=")[0]
            if not name.startswith("--"):
                continue
            matches = [name] if name in self.declared else [f for f in self.declared if f.startswith(name)]
            if len(matches) == 1:
                found.add(matches[0])
        return found


def declared_in(text: str) -> frozenset[str]:
    """Every option string that a cli_args.py declares."""
    return frozenset(name for call in _CALL.findall(text) for name in _NAME.findall(call))


def read(folder: Path) -> ComfyFlags:
    """The flags of the ComfyUI in ``folder`` (read again once its cli_args.py changes)."""
    folder = Path(os.path.abspath(folder))
    try:
        stamp = (folder / CLI_ARGS).stat().st_mtime_ns
    except OSError:
        stamp = None
    return _read(folder, stamp)


@lru_cache(maxsize=16)
def _read(folder: Path, stamp: int | None) -> ComfyFlags:
    try:
        declared = declared_in((folder / CLI_ARGS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        declared = None
    return ComfyFlags(folder, _version(folder), declared or None)


def _version(folder: Path) -> str:
    try:
        found = _VERSION.search((folder / "comfyui_version.py").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return ""
    return found.group(1) if found else ""
