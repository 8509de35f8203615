import sys

# `main` is the name pyproject's `amalgam` script points at: it returns the exit status.
from amalgam.cli import entry_point as main

if __name__ == "__main__":
    # Usage lines that jsonargparse builds from argv[0] (--model.help CLASS) then read as the command to type.
    sys.argv[0] = "python -m amalgam"
    sys.exit(main())
