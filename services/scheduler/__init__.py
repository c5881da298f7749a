"""Scheduler service: classify → policy → route → execute, for chat, completion and embedding."""
