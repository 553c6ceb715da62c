"""``python -m qft`` (also the entry point for ``torchrun -m qft``)."""

from qft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
