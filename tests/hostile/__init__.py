"""A corpus of hostile dataset pickles (``corpus.cases``), written by the tests that use it."""
