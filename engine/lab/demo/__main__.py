"""`python -m engine.lab.demo`: the same as `volley demo`."""

from engine.lab.demo.cli import main

raise SystemExit(main())
