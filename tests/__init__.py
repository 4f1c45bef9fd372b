"""The isocam test suite (a package, so that `tests.*` never resolves to a `tests` package
some dependency installs into site-packages; gmqtt 0.8.0 ships one)."""
