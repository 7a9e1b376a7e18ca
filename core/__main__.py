import sys

from hubquant.cli import main

sys.exit(main())
