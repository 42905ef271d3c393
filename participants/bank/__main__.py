from accord.participants.bank._main import main

raise SystemExit(main())
