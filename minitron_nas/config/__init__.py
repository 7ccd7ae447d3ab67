"""Settings: every section of a space file as a typed dataclass, and the YAML reader. Imports no torch."""
