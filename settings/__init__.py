"""One dataclass of defaults per method, each field with its default's origin (STYLE.md layout)."""
