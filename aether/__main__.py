from aether.entry import main

raise SystemExit(main())
