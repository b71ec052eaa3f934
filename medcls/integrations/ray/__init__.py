"""Review and training on a Ray cluster, reusing the local engine's code; ``ray`` is imported
only when a function here runs."""
