"""The editing engine: preferences → keys → values → gate → solve → apply (one module per step)."""

from .editor import PersonalizationEditor
from .report import EditReport, PreferenceResult

__all__ = ["EditReport", "PersonalizationEditor", "PreferenceResult"]
