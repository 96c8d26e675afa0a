"""A pickle an attacker with write access to shared storage would plant: unpickling it runs code (it
touches `marker`), so a test can show that a loader refused it."""

from pathlib import Path


class Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
