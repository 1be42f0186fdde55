"""Built-in attacks, installed as ``fedsec_bench.attacks`` and registered as entry points."""
