import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")
# The bundled default model is trained once per machine and reused by every test that needs it.
os.environ.setdefault("LOGRA_DIST_HOME", os.path.join(tempfile.gettempdir(), "logra-dist-test-home"))
# A shell starts a background job (`pytest ... &`) with SIGINT ignored, and the ignore is
# inherited through exec: the jobs the signal tests start would then (rightly) leave SIGINT
# alone and those tests fail. A handler here resets it to the default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
