"""``python -m wsconvert``: the same command as the ``wsconvert`` entry point."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="wsconvert")
