"""``python -m fedmosaic``: the ``fedmosaic`` command, for environments without the script
on ``PATH`` (a venv not activated, ``pipx run``, a container's system Python)."""

from fedmosaic.cli import app

if __name__ == "__main__":
    app()
