"""``python -m geo`` is the same as the ``geo`` command."""

from geo.cli import main

if __name__ == "__main__":
    main()
