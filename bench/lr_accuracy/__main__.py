import sys

from bench.lr_accuracy.run import main

sys.exit(main())
