"""vip-elector: Consul leader election for vip-manager."""

__version__ = "0.2.0"
