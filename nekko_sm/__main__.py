from nekko_sm.cli import main

raise SystemExit(main())
