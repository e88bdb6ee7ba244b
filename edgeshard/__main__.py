import sys

from edgeshard.cli.main import main

sys.exit(main())
