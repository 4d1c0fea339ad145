from sdcompiler.cli import main

raise SystemExit(main())
