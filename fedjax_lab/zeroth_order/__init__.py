"""Zeroth-order gradient estimation (the former ``fedjax_lab/zeroth_order.py``)."""
from fedjax_lab.zeroth_order.gp import *  # noqa: F401,F403
from fedjax_lab.zeroth_order.gp import _check_choice  # noqa: F401
