"""Set-up run in every Ray worker process of an in-process cluster (`runtime_env` `worker_process_setup_hook`)."""

from __future__ import annotations

import logging

# Ray Train's placement-group cleaner asks the State API once a second whether the Train controller is alive. The
# State API lives in the dashboard, which in-process Ray runs without, so it warned every second of every stage
# (about 300 of the 530 lines of the main job's terminal).
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Raise the level of Ray's loggers that repeat the same warning for the whole run to ERROR."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
