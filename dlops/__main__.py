"""``python -m dlops``: the ``dlops`` command (for an environment without its entry point on PATH)."""

from dlops.cli import app

app(prog_name="dlops")
