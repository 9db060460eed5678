from stratopy.cli import main

raise SystemExit(main())
