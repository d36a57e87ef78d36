"""relaygpt's Ray runtime, launchers and CLI. The first relaygpt package every entry point imports
(`relaygpt`, `python -m cluster.cli`, the local ranks, torchrun workers), so it pins relaygpt's
packages to where relaygpt is installed before any other is imported (cluster/own_code.py)."""

from cluster.own_code import pin as _pin

_pin()
