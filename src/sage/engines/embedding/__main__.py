"""`python -m sage.engines.embedding`."""

from sage.engines.embedding.app import main

raise SystemExit(main())
