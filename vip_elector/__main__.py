"""``python3 -m vip_elector``."""

from .cli import run

run()
