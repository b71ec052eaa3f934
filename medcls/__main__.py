import sys

from medcls.cli.main import main

sys.exit(main())
