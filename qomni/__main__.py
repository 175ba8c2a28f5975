import sys

from qomni.cli import main

sys.exit(main())
