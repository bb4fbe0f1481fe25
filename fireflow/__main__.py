import sys

from fireflow.cli import main

sys.exit(main())
