"""`python -m sage.engines.transformers`: run the transformers chat engine."""

from sage.engines.transformers.app import main

if __name__ == "__main__":
    raise SystemExit(main())
