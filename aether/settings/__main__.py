"""``python -m aether.settings``: the settings tables of docs/settings.md.

python -m aether.settings --markdown [serve|global|gateway|env]   print a table (serve's by default)
python -m aether.settings --write [PATH]    rewrite the tables in PATH (docs/settings.md)
python -m aether.settings --check [PATH]    exit 1 if PATH's tables differ from the code's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aether.settings import markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aether.settings", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", nargs="?", const="serve", choices=("serve", "global", "gateway", "env"))
    action.add_argument("--write", nargs="?", const=DOC, type=Path, metavar="PATH")
    action.add_argument("--check", nargs="?", const=DOC, type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown.table(args.markdown))
        return 0
    path = args.write or args.check
    text = path.read_text()
    fresh = markdown.rewrite(text)
    if args.check:
        if fresh != text:
            print(
                f"{path}: its settings tables differ from aether/settings/table.py: run python -m aether.settings --write {path}",
                file=sys.stderr,
            )
            return 1
        return 0
    if fresh != text:
        path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
