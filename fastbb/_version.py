"""The version of fastbb: its one source (setup.py reads this file)."""
__version__ = "0.1.0"
