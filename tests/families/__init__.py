"""One module per model family: a tiny model builder and the hand-written hook paths of the
plain-torch reference (`tests/reference.py`). `tests/test_families.py` runs every family."""
