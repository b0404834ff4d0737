"""The bad-input catalogue's rows, one module per class of mistake (see tests/test_errors_catalogue.py)."""
