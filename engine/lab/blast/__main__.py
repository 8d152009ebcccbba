"""`python -m engine.lab.blast`: the same as `volley blast`."""

from engine.lab.blast.cli import main

raise SystemExit(main())
