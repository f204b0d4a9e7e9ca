"""Split into test_layer.py (the layers' math) and test_inject.py (adapters on models). Kept only
for the tests that still import its helpers from here (test_fused.py, test_cli_run.py): delete it
once they import them from test_inject."""

from test_inject import logits, randomize_adapters  # noqa: F401
