from kitspipe.cli import main

raise SystemExit(main())
