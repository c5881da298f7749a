"""`python -m sage.engines.sim`: run the simulator engine (testing/benchmarking tool)."""

from sage.engines.sim.app import main

if __name__ == "__main__":
    raise SystemExit(main())
