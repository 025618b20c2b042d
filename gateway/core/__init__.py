"""The pure core: settings, request normalization, prices, periods, the ledger's vocabulary and
every money rule. No I/O: nothing here imports aiohttp, asyncio, a database driver or a higher
layer (``import-linter`` checks it)."""
