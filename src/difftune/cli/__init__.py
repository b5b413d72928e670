"""Command-line interface: parsing only; each command calls into the package."""
