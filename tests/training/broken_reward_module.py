"""A reward module that fails on import (for the bad-input table)."""

raise ImportError("this module needs a package that is not installed")
