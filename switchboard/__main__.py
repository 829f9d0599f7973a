"""Lets `python -m switchboard` behave exactly like the `switchboard` console script."""

from switchboard.cli import main

main()
