"""The bundles this project trains and ships in weights/: the first of SERVED is the default model, and
shapes-features is the network Fréchet distances are measured on."""

from pathlib import Path

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SERVED = (
    "shapes-softdimo-text",
    "shapes-softdimo-class",
    "shapes-teacher-text",
    "shapes-teacher-text-medium",
    "shapes-teacher-class",
)
DEFAULT_MODEL = SHIPPED_WEIGHTS / SERVED[0]
DEFAULT_FEATURES = SHIPPED_WEIGHTS / "shapes-features"
