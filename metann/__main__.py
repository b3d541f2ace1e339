"""``python -m metann``: the `metann` command."""
from metann.cli import main

raise SystemExit(main())
