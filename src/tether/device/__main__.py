from tether.device.run import main

raise SystemExit(main())
