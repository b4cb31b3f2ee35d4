"""``python3 -m nekko_sm``: runs the CLI (:func:`nekko_sm.cli.main`) and exits with its code.

The .pyz has its own entry point (``build_zipapp.py`` writes it); this one is for a checkout.
"""

from nekko_sm.cli import main

raise SystemExit(main())
