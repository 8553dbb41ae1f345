"""``tangopipe sardana-path``: where the Sardana hook macros are, for the MacroServer's MacroPath."""

from __future__ import annotations

import argparse
from pathlib import Path

from .database import DeploymentError

#: the folder of the hook macros (config/sardana/tangopipe_hooks.py)
SARDANA_MACROS = Path(__file__).resolve().parent.parent / "config" / "sardana"
HOOK_MODULE = "tangopipe_hooks.py"

DEFGH_LINES = (
    "defgh tangopipe_scan_start pre-scan",
    "defgh tangopipe_point post-acq",
    "defgh tangopipe_scan_end post-scan",
)


def macro_folder() -> Path:
    """The folder to add to the MacroServer's MacroPath; an error says why it is missing."""
    if not (SARDANA_MACROS / HOOK_MODULE).is_file():
        raise DeploymentError(
            f"{SARDANA_MACROS / HOOK_MODULE} is missing: install tangopipe from its source folder "
            "(pip install -e .) so that config/ is there"
        )
    return SARDANA_MACROS


def cmd_sardana_path(args: argparse.Namespace) -> int:
    folder = macro_folder()
    print(folder)
    if args.setup:
        print(
            f"\nAdd {folder} to the MacroServer property MacroPath (Jive), restart the MacroServer, then in spock:\n"
            f"  senv TangopipeMaster {args.master}\n" + "\n".join(f"  {line}" for line in DEFGH_LINES)
        )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sardana-path", help="print the folder of the Sardana hook macros (for the MacroServer's MacroPath)"
    )
    p.add_argument("--setup", action="store_true", help="also print the spock lines that define the hooks")
    p.add_argument("--master", default="<pipeline>/master/1", help="master device shown in --setup")
    p.set_defaults(func=cmd_sardana_path)
