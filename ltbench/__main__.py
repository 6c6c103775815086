"""``python -m ltbench``: the command line."""

from ltbench.cli import main

main()
