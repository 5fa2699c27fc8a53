"""`python -m attnsync`: the same command line as `attnsync` (see `attnsync.cli`)."""

from attnsync.cli import main

raise SystemExit(main())
