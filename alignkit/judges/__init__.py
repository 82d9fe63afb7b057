"""Generative judges: templates, verdict parsing, and local or HTTP backends."""

from alignkit.judges.backends import BACKENDS, Generation, HTTPBackend, LocalBackend
from alignkit.judges.generative import GenerativeJudge, GenerativeScorer, score_value, verdict_probability
from alignkit.judges.templates import TEMPLATES, answer_text, parse_score, parse_verdict

__all__ = ["BACKENDS", "TEMPLATES", "GenerativeJudge", "GenerativeScorer", "Generation", "HTTPBackend",
           "LocalBackend", "answer_text", "parse_score", "parse_verdict", "score_value", "verdict_probability"]
