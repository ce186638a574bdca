"""``python -m sockworks`` is the ``sockworks`` command."""

from .cli import run

run()
