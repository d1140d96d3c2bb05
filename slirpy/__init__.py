"""slirpy: user-space networking for rootless containers, a drop-in for slirp4netns."""

__version__ = "0.1.0"
