import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")
# The bundled default model is trained once per machine and reused by every test that needs it.
os.environ.setdefault("LOGRA_DIST_HOME", os.path.join(tempfile.gettempdir(), "logra-dist-test-home"))
