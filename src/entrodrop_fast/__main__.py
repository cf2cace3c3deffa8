import sys

from entrodrop_fast.cli import main

sys.exit(main())
