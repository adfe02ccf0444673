"""The ``aether`` executable. ``aether port ...`` runs inside shell substitutions
(``curl localhost:$(aether port get web)``), so it is dispatched before the rest of the command
line (and asyncio, logging, the server's settings) is imported."""

import sys


def main() -> int:
    if sys.argv[1:2] == ["port"]:
        from aether.registry.cli import main as port_main

        return port_main(sys.argv[1:])
    from aether.cli import main as cli_main

    return cli_main()
