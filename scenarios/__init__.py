"""Bundled scenarios, shipped as package data (``fedsec_bench.scenarios``) so ``fedsec list`` finds them."""
