"""The ``medcls`` command line (``python -m medcls``): argument parsing and printing only, one
module per command group; the work is done by the library."""
