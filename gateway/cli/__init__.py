"""The ``image-gateway`` command line: serving, the demo, rehearsals, keys, reports, the ledger."""
