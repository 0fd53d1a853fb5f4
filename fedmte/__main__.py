"""``python -m fedmte`` runs the CLI."""

from fedmte.cli import main

main()
