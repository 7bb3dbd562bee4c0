"""The command-line programs, one module each (``mcnn-train``: ``train``, ``mcnn-data``: ``data``, ...); each has
``main(argv=None)``."""
