"""``python -m modalpeft``: the console script."""

from modalpeft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
