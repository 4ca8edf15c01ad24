import sys

from storagetm.cli import main

sys.exit(main())
