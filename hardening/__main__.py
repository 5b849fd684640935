from hardening.main import main

raise SystemExit(main())
