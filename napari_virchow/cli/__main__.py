"""``python -m napari_virchow.cli``."""

from napari_virchow.cli.app import main

raise SystemExit(main())
