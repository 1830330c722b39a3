import sys

from fray_tpu.worker.main import main

sys.exit(main())
