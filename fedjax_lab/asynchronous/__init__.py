"""Asynchronous and heterogeneous systems: a jitted simulated clock (``clock.py``), the
system model (``system.py``), staleness functions and the methods built on them."""
from fedjax_lab.asynchronous import clock, methods, staleness, system
from fedjax_lab.asynchronous.clock import AsyncRun, AsyncSpec, ClockState, make_async
from fedjax_lab.asynchronous.system import SystemModel, make_system
