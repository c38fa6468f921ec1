"""``python -m mia``: see mia.cli."""
from mia.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
