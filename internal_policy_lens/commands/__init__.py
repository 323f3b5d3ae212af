"""What each command does beyond building its config: the top floor, called only by ``cli.py``.

``options`` turns the config dataclasses into the command line's options; the other modules
hold the commands' orchestration (reading folders, choosing an engine, saving figures, wording
the summary), each returning the text the command prints.
"""
