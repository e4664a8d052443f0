from immich_stream.cli import main

raise SystemExit(main())
