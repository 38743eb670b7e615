"""``python -m runtimestate``: the same command line as the ``runtimestate`` script."""

from runtimestate.cli import main

if __name__ == "__main__":
    main()
