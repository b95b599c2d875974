"""The editing engine: preferences → keys → values → gate → solve → apply (one module per step)."""

from .editor import PersonalizationEditor
from .gate import shifted_thresholds
from .report import EditReport, PreferenceResult

__all__ = ["EditReport", "PersonalizationEditor", "PreferenceResult", "shifted_thresholds"]
