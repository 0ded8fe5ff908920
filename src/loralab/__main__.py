from loralab.cli import main

raise SystemExit(main())
