"""``python -m peft_cp_merge``: the ``peft-cp-merge`` command line."""

from .cli import main

raise SystemExit(main())
