import sys

from cpt_megatron.cli import main

sys.exit(main())
