"""Example configs shipped with difftune (the demo's embedded default among them)."""
