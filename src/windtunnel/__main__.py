"""``python -m windtunnel``: the same command line as the ``windtunnel`` script."""

from windtunnel.cli import main

if __name__ == "__main__":
    main()
