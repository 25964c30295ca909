from mlops_training.cli import main

raise SystemExit(main())
