"""`python -m forwarder` is the same as the `forwarder` command."""

import sys

from forwarder.cli import main

sys.exit(main())
