import sys

# `main` is the name pyproject's `amalgam` script points at: it returns the exit status.
from amalgam.cli import entry_point as main

if __name__ == "__main__":
    sys.exit(main())
