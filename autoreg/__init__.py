"""autoreg: a measured search for the best SimpleITK registration recipe of a dataset."""

__version__ = "0.1.0"
