"""``python -m khutulun.cli``: the same as the ``khutulun`` command."""

from khutulun.cli import main

main()
