"""`python -m dtl ...` is the same as the `dtl` console script (and what torchrun launches)."""

from dtl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
