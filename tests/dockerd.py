"""Tests import the dockerd process helper from here; it lives in the package for the Docker lab."""

from flannelpy.lab.dockerd import BUSYBOX, BUSYBOX_IMAGE, Dockerd

__all__ = ["BUSYBOX", "BUSYBOX_IMAGE", "Dockerd"]
