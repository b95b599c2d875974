"""The editing engine: preferences → keys → values → solve → gate → apply (one module per step)."""

from .editor import PersonalizationEditor
from .report import EditReport, PreferenceResult

__all__ = ["EditReport", "PersonalizationEditor", "PreferenceResult"]
