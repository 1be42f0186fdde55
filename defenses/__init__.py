"""Built-in defenses, installed as ``fedsec_bench.defenses`` and registered as entry points."""
