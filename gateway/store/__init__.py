"""Storage: one interface (``base.Store``), one module per engine.

``sqlite`` is the embedded default (one gateway process per file).
"""
