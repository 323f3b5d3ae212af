"""The ``ipl`` command line."""

import typer

app = typer.Typer(help="internal-policy-lens")
