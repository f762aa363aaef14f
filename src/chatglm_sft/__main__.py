import sys

from chatglm_sft.cli import main

sys.exit(main())
