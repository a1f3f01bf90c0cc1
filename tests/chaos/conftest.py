"""Chaos fixtures: the tiny classifier the worker processes serve (built once per session)."""
from tinymodels import tiny_bert_classifier_dir  # noqa: F401  (fixture)
