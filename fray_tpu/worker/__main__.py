import sys

from fray_tpu.worker import uvfetch

uvfetch.start()  # before the agent's imports: on a VM's many cores uv arrives while the agent starts

from fray_tpu.worker.main import main  # noqa: E402

sys.exit(main())
