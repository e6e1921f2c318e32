"""`python -m vlsi_cli` runs the `vlsi` command."""

from . import main

main()
