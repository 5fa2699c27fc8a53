"""`python -m attnsync.verify`: the same as `attnsync verify`."""

from attnsync.verify.cli import main

raise SystemExit(main())
