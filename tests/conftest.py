import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n auto`: one process per core, so one thread each
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: one of the slowest tests (tens of seconds); still part of the suite")
