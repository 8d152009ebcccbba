"""`python -m engine.lab.sink`: the same as `volley sink`."""

from engine.lab.sink.cli import main

raise SystemExit(main())
