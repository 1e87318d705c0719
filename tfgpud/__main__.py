import sys

from tfgpud.cli import main

sys.exit(main())
