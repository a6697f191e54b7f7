"""``python -m service.report SWEEP_RUN_NAME [FLAGS]``: the report's command line (:func:`service.report.main`)."""
from service.report import main

raise SystemExit(main())
