"""The test suite. Imported before any test module or conftest, hence the one setting below.

The suite starts ~400 Python processes (gateways, commands, fakes) and pytest rewrites every test
module in each worker. Under PYTHONDONTWRITEBYTECODE (set in some CI images) none of that bytecode
would ever be cached, and each process would compile the package again: the tests' own imports
write it, to the checkout's git-ignored ``__pycache__`` folders, for the processes to read.
"""

import sys

sys.dont_write_bytecode = False
