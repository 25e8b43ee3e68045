"""mirror: a pull-through caching registry for container images."""

__version__ = "0.1.0"
